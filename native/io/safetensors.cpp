#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <set>

#include "io/json.h"
#include "io/sha256.h"

namespace tl::st {
namespace {

// Python's safetensors refuses headers over 100 MB; so do we.
constexpr uint64_t kMaxHeader = 100ull * 1000 * 1000;

struct DtypeEntry {
  const char* name;
  torch::ScalarType type;
  size_t size;
};
const DtypeEntry kDtypes[] = {
    {"F64", torch::kFloat64, 8}, {"F32", torch::kFloat32, 4}, {"F16", torch::kFloat16, 2},
    {"BF16", torch::kBFloat16, 2}, {"I64", torch::kInt64, 8}, {"I32", torch::kInt32, 4},
    {"I16", torch::kInt16, 2},   {"I8", torch::kInt8, 1},     {"U8", torch::kUInt8, 1},
    {"BOOL", torch::kBool, 1},
};

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw FormatError(path + ": " + what);
}

std::string shape_text(const Json& shape) {
  std::string s = "[";
  for (const auto& d : shape.as_array()) s += (s.size() > 1 ? ", " : "") + std::to_string(static_cast<uint64_t>(d.as_number()));
  return s + "]";
}

std::string errno_text(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

}  // namespace

const TensorInfo* Header::find(const std::string& name) const {
  auto it = index.find(name);
  return it == index.end() ? nullptr : &tensors[it->second];
}

torch::ScalarType dtype_from_name(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.type;
  throw std::invalid_argument("unsupported safetensors dtype \"" + name + "\"");
}

std::string dtype_name(torch::ScalarType t) {
  for (const auto& d : kDtypes)
    if (t == d.type) return d.name;
  throw std::invalid_argument(std::string("dtype ") + c10::toString(t) + " cannot be stored in safetensors here");
}

size_t dtype_size(const std::string& name) {
  for (const auto& d : kDtypes)
    if (name == d.name) return d.size;
  throw std::invalid_argument("unsupported safetensors dtype \"" + name + "\"");
}

static Header parse_header(const std::string& path, const std::string& json_text, uint64_t data_start,
                           uint64_t file_size) {
  Header h;
  h.data_start = data_start;
  h.file_size = file_size;
  Json j;
  try {
    j = Json::parse(json_text);
  } catch (const std::exception& e) {
    bad(path, std::string("the header is not valid JSON (") + e.what() + "): the file is corrupt or not safetensors");
  }
  if (!j.is_object()) bad(path, "the header must be a JSON object, got " + j.type_name());
  const uint64_t data_size = file_size - data_start;
  for (const auto& [name, v] : j.as_object()) {
    if (name == "__metadata__") {
      if (!v.is_object()) bad(path, "__metadata__ must be an object of strings");
      for (const auto& [k, mv] : v.as_object()) {
        if (!mv.is_string()) bad(path, "__metadata__[\"" + k + "\"] must be a string, got " + mv.type_name());
        h.metadata[k] = mv.as_string();
      }
      continue;
    }
    const std::string where = "tensor \"" + name + "\"";
    if (!v.is_object()) bad(path, where + ": entry must be an object");
    for (const auto& [k, _] : v.as_object())
      if (k != "dtype" && k != "shape" && k != "data_offsets") bad(path, where + ": unknown field \"" + k + "\"");
    TensorInfo t;
    t.name = name;
    if (!v["dtype"].is_string()) bad(path, where + ": missing or non-string \"dtype\"");
    t.dtype = v["dtype"].as_string();
    size_t isz;
    try {
      isz = dtype_size(t.dtype);
    } catch (const std::exception& e) {
      bad(path, where + ": " + e.what());
    }
    if (!v["shape"].is_array()) bad(path, where + ": missing or non-array \"shape\"");
    // The product of the non-zero dimensions bounds what libtorch computes for strides and sizes even when a zero
    // dimension makes the element count 0: keep it below 2^62 bytes' worth, so nothing overflows later.
    constexpr double kMaxDim = 9007199254740992.0;  // 2^53: JSON numbers above it are not exact integers
    uint64_t numel = 1, extent = 1;
    for (const auto& d : v["shape"].as_array()) {
      if (!d.is_number() || d.as_number() < 0 || d.as_number() > kMaxDim || d.as_number() != std::floor(d.as_number()))
        bad(path, where + ": shape entries must be non-negative integers");
      int64_t n = static_cast<int64_t>(d.as_number());
      t.shape.push_back(n);
      if (n != 0 && extent > (uint64_t(1) << 62) / (static_cast<uint64_t>(n) * isz))
        bad(path, where + ": shape " + shape_text(v["shape"]) + " is too large (over 2^62 bytes): the file is corrupt");
      if (n != 0) extent *= static_cast<uint64_t>(n);
      numel *= static_cast<uint64_t>(n);
    }
    const auto& off = v["data_offsets"];
    if (!off.is_array() || off.as_array().size() != 2 || !off.as_array()[0].is_number() || !off.as_array()[1].is_number())
      bad(path, where + ": \"data_offsets\" must be [begin, end]");
    double b = off.as_array()[0].as_number(), e = off.as_array()[1].as_number();
    if (b < 0 || e < 0 || b != static_cast<double>(static_cast<uint64_t>(b)) || e != static_cast<double>(static_cast<uint64_t>(e)))
      bad(path, where + ": data_offsets must be non-negative integers");
    t.begin = static_cast<uint64_t>(b);
    t.end = static_cast<uint64_t>(e);
    if (t.end < t.begin) bad(path, where + ": data_offsets end " + std::to_string(t.end) + " is before begin " + std::to_string(t.begin));
    if (t.end > data_size)
      bad(path, where + ": data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                    "] point past the end of the file (data is " + std::to_string(data_size) +
                    " bytes): the file is truncated or corrupt");
    if (t.end - t.begin != numel * isz)
      bad(path, where + ": " + std::to_string(t.end - t.begin) + " bytes for shape with " + std::to_string(numel) +
                    " elements of " + t.dtype + " (" + std::to_string(numel * isz) + " bytes expected)");
    h.tensors.push_back(std::move(t));
  }
  // Tensors must tile the data buffer exactly: no overlap, no holes (as Python's safetensors requires).
  std::vector<const TensorInfo*> sorted;
  for (const auto& t : h.tensors) sorted.push_back(&t);
  std::sort(sorted.begin(), sorted.end(), [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  uint64_t pos = 0;
  for (const auto* t : sorted) {
    if (t->begin < pos) bad(path, "tensor \"" + t->name + "\" overlaps the previous tensor's bytes (data_offsets begin " + std::to_string(t->begin) + " < " + std::to_string(pos) + ")");
    if (t->begin > pos) bad(path, "bytes " + std::to_string(pos) + ".." + std::to_string(t->begin) + " of the data are not covered by any tensor before \"" + t->name + "\"");
    pos = t->end;
  }
  if (pos != data_size)
    bad(path, "the data buffer has " + std::to_string(data_size - pos) + " trailing bytes not covered by any tensor");
  // Report tensors in storage order (the order they were written), not the header's key order.
  std::stable_sort(h.tensors.begin(), h.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) { return a.begin < b.begin; });
  h.index.reserve(h.tensors.size());
  for (size_t i = 0; i < h.tensors.size(); ++i) h.index.emplace(h.tensors[i].name, i);
  return h;
}

Header read_header(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad(path, "cannot open: " + errno_text(errno));
  struct stat sb;
  if (::fstat(fd, &sb) != 0) {
    int err = errno;
    ::close(fd);
    bad(path, "cannot stat: " + errno_text(err));
  }
  auto file_size = static_cast<uint64_t>(sb.st_size);
  auto read_exact = [&](void* buf, size_t n, off_t at) {
    size_t got = 0;
    while (got < n) {
      ssize_t r = ::pread(fd, static_cast<char*>(buf) + got, n - got, at + static_cast<off_t>(got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return false;
      got += static_cast<size_t>(r);
    }
    return true;
  };
  if (file_size < 8) {
    ::close(fd);
    bad(path, "file is " + std::to_string(file_size) + " bytes, too short to be safetensors (truncated or empty)");
  }
  uint8_t lenbuf[8];
  if (!read_exact(lenbuf, 8, 0)) {
    ::close(fd);
    bad(path, "cannot read the header length");
  }
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | lenbuf[i];
  if (n > kMaxHeader) {
    ::close(fd);
    bad(path, "header length " + std::to_string(n) + " exceeds the 100 MB limit: not a safetensors file or corrupt");
  }
  if (n > file_size - 8) {
    ::close(fd);
    bad(path, "header length " + std::to_string(n) + " is larger than the rest of the file (" + std::to_string(file_size - 8) + " bytes): truncated or corrupt");
  }
  std::string text(n, '\0');
  if (n && !read_exact(text.data(), n, 8)) {
    ::close(fd);
    bad(path, "cannot read the header");
  }
  ::close(fd);
  // Trailing spaces are the writer's alignment padding.
  return parse_header(path, text, 8 + n, file_size);
}

struct File::Mapping {
  void* addr = nullptr;
  size_t size = 0;
  ~Mapping() {
    if (addr && size) ::munmap(addr, size);
  }
};

File::File(const std::string& path) : path_(path), header_(read_header(path)), map_(std::make_shared<Mapping>()) {
  if (header_.file_size == 0) return;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) bad(path, "cannot open: " + errno_text(errno));
  // Private + writable: copy-on-write pages, so a tensor that is modified in place never writes to the file.
  void* addr = ::mmap(nullptr, header_.file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (addr == MAP_FAILED) bad(path, "cannot mmap: " + errno_text(err));
  map_->addr = addr;
  map_->size = header_.file_size;
}

torch::Tensor File::get(const std::string& name, std::optional<torch::ScalarType> dtype,
                        std::optional<torch::Device> device) const {
  const TensorInfo* info = header_.find(name);
  if (!info) bad(path_, "has no tensor named \"" + name + "\"");
  auto type = dtype_from_name(info->dtype);
  auto opts = torch::TensorOptions().dtype(type);
  char* ptr = static_cast<char*>(map_->addr) + header_.data_start + info->begin;
  torch::Tensor t;
  if (info->end == info->begin) {
    t = torch::empty(info->shape, opts);
  } else {
    auto keep = map_;
    t = torch::from_blob(ptr, info->shape, [keep](void*) mutable { keep.reset(); }, opts);
    // Unaligned data (allowed by the format) is copied so every kernel sees aligned memory.
    if (reinterpret_cast<uintptr_t>(ptr) % dtype_size(info->dtype) != 0) t = t.clone();
  }
  if (dtype && *dtype != type) t = t.to(*dtype);
  if (device && *device != t.device()) t = t.to(*device);
  return t;
}

std::vector<std::pair<std::string, torch::Tensor>> load(const std::string& path, std::optional<torch::ScalarType> dtype,
                                                        std::optional<torch::Device> device) {
  File f(path);
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& t : f.header().tensors) out.emplace_back(t.name, f.get(t.name, dtype, device));
  return out;
}

void fsync_dir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw std::runtime_error(dir + ": cannot open folder for fsync: " + errno_text(errno));
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL) throw std::runtime_error(dir + ": fsync failed: " + errno_text(err));
}

Written save(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
             const std::map<std::string, std::string>& metadata) {
  Json::Object header;
  std::vector<torch::Tensor> data;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") throw std::invalid_argument("a tensor cannot be named __metadata__");
    if (!seen.insert(name).second) throw std::invalid_argument("duplicate tensor name \"" + name + "\"");
    torch::Tensor t = tensor.detach().to(torch::kCPU).contiguous();
    std::string dname = dtype_name(t.scalar_type());
    uint64_t nbytes = static_cast<uint64_t>(t.numel()) * t.element_size();
    Json::Array shape;
    for (auto s : t.sizes()) shape.emplace_back(static_cast<int64_t>(s));
    header[name] = Json(Json::Object{{"dtype", Json(dname)}, {"shape", Json(shape)},
                                     {"data_offsets", Json(Json::Array{Json(offset), Json(offset + nbytes)})}});
    offset += nbytes;
    data.push_back(t);
  }
  if (!metadata.empty()) {
    Json::Object m;
    for (const auto& [k, v] : metadata) m[k] = Json(v);
    header["__metadata__"] = Json(std::move(m));
  }
  std::string text = Json(std::move(header)).dump();
  while ((8 + text.size()) % 8 != 0) text += ' ';

  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error(path + ": cannot create temporary file " + tmp + ": " + errno_text(errno));
  auto fail = [&](const std::string& what, int err) {
    ::close(fd);
    ::unlink(tmp.c_str());
    std::string hint = err == ENOSPC ? " — the disk is full: free space and try again" : "";
    throw std::runtime_error(path + ": " + what + ": " + errno_text(err) + hint);
  };
  Sha256 hash;
  Written written;
  auto write_all = [&](const void* buf, size_t n) {
    hash.update(buf, n);
    written.size += n;
    const char* p = static_cast<const char*>(buf);
    while (n > 0) {
      ssize_t w = ::write(fd, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w < 0) fail("write failed", errno);
      p += w;
      n -= static_cast<size_t>(w);
    }
  };
  uint8_t lenbuf[8];
  uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) lenbuf[i] = static_cast<uint8_t>(n >> (8 * i));
  write_all(lenbuf, 8);
  write_all(text.data(), text.size());
  for (const auto& t : data)
    if (t.numel()) write_all(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size());
  if (::fsync(fd) != 0) fail("fsync failed", errno);
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": close failed: " + errno_text(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error(path + ": rename from temporary file failed: " + errno_text(err));
  }
  auto slash = path.find_last_of('/');
  fsync_dir(slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash)));
  written.sha256 = hash.hex();
  return written;
}

}  // namespace tl::st
