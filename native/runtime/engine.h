// The torch thread. Every libtorch call of the addon runs on ONE native thread owned by the addon: calling
// torch from the JS thread and libuv's pool as well made small ops 5-8x slower on 2 cores (measured).
// JS submits jobs and gets Promises; a job's result is turned into JS values back on the JS thread.
#pragma once
#include <napi.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace tl {

// Built on the torch thread, run on the JS thread to make the Promise's value. It must not touch torch
// objects: convert tensors to plain bytes/numbers on the torch thread first.
using Completion = std::function<Napi::Value(Napi::Env)>;

// An error a user can act on; `code` becomes the JS Error's `code` property.
struct UserError : std::runtime_error {
  std::string code;
  UserError(std::string c, const std::string& msg) : std::runtime_error(msg), code(std::move(c)) {}
};

class Engine {
 public:
  explicit Engine(Napi::Env env);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  static Engine& of(Napi::Env env);
  static Engine* maybe(Napi::Env env);

  // Runs `work` on the torch thread; the Promise resolves with its Completion's value, or rejects with an
  // Error carrying the exception's message (and `code` for UserError).
  Napi::Promise run(Napi::Env env, std::function<Completion()> work);
  // Two-phase job: `snapshot` runs on the torch thread (copy what must be saved, in order with the training jobs
  // around it); the function it returns runs on the addon's single I/O thread (writing files), so the torch thread
  // goes on training meanwhile. I/O jobs run one at a time, in order. The Promise settles after the I/O phase.
  Napi::Promise run_then_io(Napi::Env env, std::function<std::function<Completion()>()> snapshot);
  // Fire-and-forget work on the torch thread (releasing handles). False (and `work` dropped) once shutting down.
  bool post(std::function<void()> work);
  // Sends a value to a JS callback from inside a running job (progress reports); never blocks the job for long.
  void notify(std::shared_ptr<Napi::FunctionReference> cb, Completion make_arg);

  // Finishes the queued jobs (their Promises still settle), then stops both threads; later calls reject with
  // code ESHUTDOWN. Also run when the environment is torn down.
  void shutdown();

  bool on_torch_thread() const { return std::this_thread::get_id() == thread_.get_id(); }

 private:
  struct Done;
  void loop();
  void deliver(Done* done);
  static void on_js(Napi::Env env, Napi::Function, void*, Done* done);

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stop_ = false;
  Napi::TypedThreadSafeFunction<void, Done, &Engine::on_js> tsfn_;
  size_t pending_ = 0;  // JS thread only: jobs whose Promise is unsettled (keeps the loop alive)
  std::thread thread_;
  // The I/O thread (background checkpoint writes).
  std::mutex io_mu_;
  std::condition_variable io_cv_;
  std::deque<std::function<void()>> io_queue_;
  bool io_stop_ = false;
  std::thread io_thread_;
  void io_loop();
  void post_io(std::function<void()> work);
  Done* make_done(Napi::Env env);
  void reject_now(Napi::Env env, Done* done);
  static void settle(Done* done, const std::function<Completion()>& work);
};

// Opaque handles: JS holds an External that owns a shared_ptr; the object is released on the torch thread.
struct HandleBox {
  const char* kind;
  std::shared_ptr<void> ptr;
};

// Handles JS still holds (neither disposed nor garbage-collected), by kind: leak checks (native().liveHandles()).
void count_handle(const char* kind, int delta);
std::map<std::string, int64_t> live_handles();

template <class T>
Napi::Value wrap_handle(Napi::Env env, std::shared_ptr<T> p, const char* kind) {
  auto* box = new HandleBox{kind, std::static_pointer_cast<void>(std::move(p))};
  count_handle(kind, +1);
  return Napi::External<HandleBox>::New(env, box, [](Napi::Env env, HandleBox* b) {
    if (b->ptr) count_handle(b->kind, -1);
    if (Engine* e = Engine::maybe(env)) {
      auto keep = std::move(b->ptr);
      e->post([keep]() mutable { keep.reset(); });
    }
    delete b;
  });
}

template <class T>
std::shared_ptr<T> unwrap_handle(const Napi::Value& v, const char* kind) {
  if (!v.IsExternal()) throw Napi::TypeError::New(v.Env(), std::string("expected a ") + kind + " handle");
  auto* box = v.As<Napi::External<HandleBox>>().Data();
  if (!box || std::string(box->kind) != kind)
    throw Napi::TypeError::New(v.Env(), std::string("expected a ") + kind + " handle, got " + (box ? box->kind : "null"));
  if (!box->ptr) throw Napi::Error::New(v.Env(), std::string("this ") + kind + " handle was disposed");
  return std::static_pointer_cast<T>(box->ptr);
}

// Drops the handle's object now (on the torch thread); later use of the handle throws.
void dispose_handle(Napi::Env env, const Napi::Value& v);

}  // namespace tl
