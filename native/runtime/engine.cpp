#include "runtime/engine.h"

#include <torch/torch.h>

namespace tl {

struct Engine::Done {
  // Exactly one of: a promise to settle (with value or error), or a progress callback to call.
  std::unique_ptr<Napi::Promise::Deferred> deferred;
  std::shared_ptr<Napi::FunctionReference> callback;
  Completion completion;
  std::string error;
  std::string code;
  bool failed = false;
};

Engine::Engine(Napi::Env env) {
  tsfn_ = Napi::TypedThreadSafeFunction<void, Done, &Engine::on_js>::New(env, "train-lora torch thread", 0, 1);
  tsfn_.Unref(env);
  thread_ = std::thread([this] { loop(); });
  io_thread_ = std::thread([this] { io_loop(); });
}

Engine::~Engine() {
  shutdown();
  tsfn_.Release();
}

void Engine::shutdown() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();  // runs what was queued first
  {
    std::lock_guard<std::mutex> lk(io_mu_);
    io_stop_ = true;
  }
  io_cv_.notify_all();
  if (io_thread_.joinable()) io_thread_.join();
}

Engine& Engine::of(Napi::Env env) {
  Engine* e = env.GetInstanceData<Engine>();
  if (!e) throw Napi::Error::New(env, "train-lora: the native engine is not running");
  return *e;
}

Engine* Engine::maybe(Napi::Env env) { return env.GetInstanceData<Engine>(); }

void Engine::loop() {
  while (true) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_ and drained
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    job();
  }
}

void Engine::io_loop() {
  while (true) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lk(io_mu_);
      io_cv_.wait(lk, [&] { return io_stop_ || !io_queue_.empty(); });
      if (io_queue_.empty()) return;
      job = std::move(io_queue_.front());
      io_queue_.pop_front();
    }
    job();
  }
}

void Engine::post_io(std::function<void()> work) {
  {
    std::lock_guard<std::mutex> lk(io_mu_);
    io_queue_.push_back(std::move(work));
  }
  io_cv_.notify_one();
}

bool Engine::post(std::function<void()> work) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (stop_) return false;
    queue_.push_back(std::move(work));
  }
  cv_.notify_one();
  return true;
}

// A job that can no longer run (the engine is shutting down): its Promise rejects now instead of never settling.
void Engine::reject_now(Napi::Env env, Done* done) {
  std::unique_ptr<Done> d(done);
  if (--pending_ == 0) tsfn_.Unref(env);
  Napi::Error err = Napi::Error::New(env, "train-lora: the native engine has shut down (the process is exiting); the work was not run");
  err.Set("code", Napi::String::New(env, "ESHUTDOWN"));
  d->deferred->Reject(err.Value());
}

void Engine::deliver(Done* done) {
  if (tsfn_.BlockingCall(done) != napi_ok) delete done;  // the environment is shutting down
}

void Engine::on_js(Napi::Env env, Napi::Function, void*, Done* done) {
  std::unique_ptr<Done> d(done);
  if (env == nullptr) return;  // finalizing
  Engine* engine = Engine::maybe(env);
  Napi::HandleScope scope(env);
  if (d->callback) {
    try {
      Napi::Value arg = d->completion(env);
      d->callback->Value().Call({arg});
    } catch (const Napi::Error& e) {
      // A throwing progress callback must not take the job down; report it on stderr.
      fprintf(stderr, "train-lora: progress callback threw: %s\n", e.Message().c_str());
    } catch (const std::exception& e) {
      fprintf(stderr, "train-lora: progress callback failed: %s\n", e.what());
    } catch (...) {
      fprintf(stderr, "train-lora: progress callback failed\n");
    }
    return;
  }
  if (engine && --engine->pending_ == 0) engine->tsfn_.Unref(env);
  if (d->failed) {
    Napi::Error err = Napi::Error::New(env, d->error);
    if (!d->code.empty()) err.Set("code", Napi::String::New(env, d->code));
    d->deferred->Reject(err.Value());
    return;
  }
  try {
    d->deferred->Resolve(d->completion ? d->completion(env) : env.Undefined());
  } catch (const Napi::Error& e) {
    d->deferred->Reject(e.Value());
  } catch (const std::exception& e) {
    d->deferred->Reject(Napi::Error::New(env, e.what()).Value());
  }
}

Engine::Done* Engine::make_done(Napi::Env env) {
  auto deferred = std::make_unique<Napi::Promise::Deferred>(env);
  if (pending_++ == 0) tsfn_.Ref(env);
  auto* done = new Done();
  done->deferred = std::move(deferred);
  return done;
}

// Runs `work`, recording its Completion or its error in `done`.
void Engine::settle(Done* done, const std::function<Completion()>& work) {
  try {
    done->completion = work();
  } catch (const UserError& e) {
    done->failed = true;
    done->error = e.what();
    done->code = e.code;
  } catch (const c10::Error& e) {
    done->failed = true;
    done->error = e.what_without_backtrace();
  } catch (const std::exception& e) {
    done->failed = true;
    done->error = e.what();
  } catch (...) {
    done->failed = true;
    done->error = "unknown native error";
  }
}

Napi::Promise Engine::run(Napi::Env env, std::function<Completion()> work) {
  Done* done = make_done(env);
  Napi::Promise promise = done->deferred->Promise();
  const bool posted = post([this, done, work = std::move(work)]() mutable {
    settle(done, work);
    work = nullptr;  // release captured handles on this thread
    deliver(done);
  });
  if (!posted) reject_now(env, done);
  return promise;
}

Napi::Promise Engine::run_then_io(Napi::Env env, std::function<std::function<Completion()>()> snapshot) {
  Done* done = make_done(env);
  Napi::Promise promise = done->deferred->Promise();
  const bool posted = post([this, done, snapshot = std::move(snapshot)]() mutable {
    std::function<Completion()> io;
    settle(done, [&] {
      io = snapshot();
      return Completion();
    });
    snapshot = nullptr;
    if (done->failed || !io) {
      deliver(done);
      return;
    }
    post_io([this, done, io = std::move(io)]() mutable {
      settle(done, io);
      io = nullptr;
      deliver(done);
    });
  });
  if (!posted) reject_now(env, done);
  return promise;
}

void Engine::notify(std::shared_ptr<Napi::FunctionReference> cb, Completion make_arg) {
  auto* done = new Done();
  done->callback = std::move(cb);
  done->completion = std::move(make_arg);
  if (tsfn_.NonBlockingCall(done) != napi_ok) delete done;
}

namespace {
std::mutex g_handles_mu;
std::map<std::string, int64_t> g_handles;
}  // namespace

void count_handle(const char* kind, int delta) {
  std::lock_guard<std::mutex> lk(g_handles_mu);
  if ((g_handles[kind] += delta) == 0) g_handles.erase(kind);
}

std::map<std::string, int64_t> live_handles() {
  std::lock_guard<std::mutex> lk(g_handles_mu);
  return g_handles;
}

void dispose_handle(Napi::Env env, const Napi::Value& v) {
  if (!v.IsExternal()) throw Napi::TypeError::New(env, "dispose: expected a handle");
  auto* box = v.As<Napi::External<HandleBox>>().Data();
  if (!box || !box->ptr) return;
  count_handle(box->kind, -1);
  auto keep = std::move(box->ptr);
  Engine::of(env).post([keep]() mutable { keep.reset(); });
}

}  // namespace tl
