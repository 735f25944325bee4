// safetensors I/O: validated header parsing, memory-mapped zero-copy reads, atomic writes.
// Format: 8-byte little-endian header length N, N bytes of JSON header, then the raw data buffer.
#pragma once
#include <torch/torch.h>

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace tl {

// Tensors by name, in a fixed order (a state dict as a file holds it).
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

}  // namespace tl

namespace tl::st {

struct TensorInfo {
  std::string name;
  std::string dtype;  // safetensors name: F32, F16, BF16, ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range relative to the data buffer
};

struct Header {
  std::vector<TensorInfo> tensors;  // in storage order (data offsets)
  std::map<std::string, std::string> metadata;
  uint64_t data_start = 0;  // 8 + N
  uint64_t file_size = 0;
  // O(1) by name (a file may hold hundreds of thousands of tensors: a linear search per name was quadratic).
  const TensorInfo* find(const std::string& name) const;
  std::unordered_map<std::string, size_t> index;  // name -> position in tensors
};

// Thrown for every problem with a file; the message names the file.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

torch::ScalarType dtype_from_name(const std::string& name);  // throws std::invalid_argument
std::string dtype_name(torch::ScalarType t);                 // throws std::invalid_argument
size_t dtype_size(const std::string& name);

// Reads and validates only the header (cheap: no data is touched).
Header read_header(const std::string& path);

// A memory-mapped safetensors file. Tensors returned without conversion share the mapping (copy-on-write
// private mapping: writing to them never touches the file), which stays alive as long as any of them does.
class File {
 public:
  explicit File(const std::string& path);
  const Header& header() const { return header_; }
  const std::string& path() const { return path_; }
  // The tensor as stored (zero-copy when aligned), then converted to dtype/device when given.
  torch::Tensor get(const std::string& name, std::optional<torch::ScalarType> dtype = std::nullopt,
                    std::optional<torch::Device> device = std::nullopt) const;

 private:
  struct Mapping;
  std::string path_;
  Header header_;
  std::shared_ptr<Mapping> map_;
};

// Loads every tensor (storage order).
NamedTensors load(const std::string& path, std::optional<torch::ScalarType> dtype = std::nullopt,
                  std::optional<torch::Device> device = std::nullopt);

// What save() wrote: the file's size and SHA-256 (hashed from the bytes as they were written).
struct Written {
  uint64_t size = 0;
  std::string sha256;
};

// Writes atomically: a temporary file beside the target, fsync, rename, fsync of the folder.
// Tensors are written in the given order; names must be unique. Non-CPU or non-contiguous tensors are copied.
Written save(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
             const std::map<std::string, std::string>& metadata = {});

// fsync a folder (after a rename into it). Throws on failure.
void fsync_dir(const std::string& dir);

}  // namespace tl::st
