// The C side of helpers::dist: PyTorch's own c10d (the engine torchrun, DDP, FSDP and torchtitan
// use) reached through a few extern "C" calls. Gloo runs on CPU (and moves CUDA tensors through the
// host); the process group object is ProcessGroupGloo from libtorch_cpu.so.
//
// Every entry point catches C++ exceptions and hands the message back as a malloc'd string (NULL on
// success) that Rust frees with moe_dist_free_string: an exception escaping into Rust would abort
// the process, and in a notebook that costs the user everything.
//
// Tensors cross as tch does it: tch's C_tensor is an at::Tensor*; a new tensor goes back as
// `new at::Tensor(...)` and Rust takes ownership with Tensor::from_ptr.
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;  // the run's store (prefixed), for sub-groups
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int size;
  std::chrono::milliseconds timeout;
  int subgroups = 0;  // sub-groups made from this group so far (names their store prefix)
};

char* message(const std::string& what) {
  char* s = static_cast<char*>(std::malloc(what.size() + 1));
  if (s != nullptr) std::memcpy(s, what.c_str(), what.size() + 1);
  return s;
}

template <typename F>
char* guard(const char* op, F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return message(std::string(op) + ": " + e.what_without_backtrace());
  } catch (const std::exception& e) {
    return message(std::string(op) + ": " + e.what());
  } catch (...) {
    return message(std::string(op) + ": unknown C++ exception");
  }
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, const Group& g) {
  // Gloo's own timeout (the group's) bounds every send and receive; this bounds the wait as well.
  if (!work->wait(g.timeout)) TORCH_CHECK(false, "the collective did not complete");
}

c10::intrusive_ptr<c10d::Backend> make_gloo(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                       std::chrono::milliseconds timeout) {
  auto opts = c10d::ProcessGroupGloo::Options::create_default(timeout);
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts);
}

std::vector<int64_t> splits(const int64_t* p, int64_t n) { return std::vector<int64_t>(p, p + n); }

at::Tensor all_to_all_raw(Group* g, const at::Tensor& input, std::vector<int64_t> out_splits,
                          std::vector<int64_t> in_splits) {
  auto in = input.contiguous();
  int64_t rows = 0;
  for (auto s : out_splits) rows += s;
  auto sizes = in.sizes().vec();
  sizes[0] = rows;
  auto out = at::empty(sizes, in.options());
  wait(g->backend->alltoall_base(out, in, out_splits, in_splits), *g);
  return out;
}

// The all-to-all with a backward: the gradient of the received rows goes back to the ranks that
// sent them (the same exchange with the splits swapped). PyTorch registers this backward from
// Python, so a process without Python needs its own.
struct AllToAll : public torch::autograd::Function<AllToAll> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, at::Tensor input, int64_t group,
                            std::vector<int64_t> out_splits, std::vector<int64_t> in_splits) {
    ctx->saved_data["group"] = group;
    ctx->saved_data["out_splits"] = out_splits;
    ctx->saved_data["in_splits"] = in_splits;
    return all_to_all_raw(reinterpret_cast<Group*>(group), input, out_splits, in_splits);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto* g = reinterpret_cast<Group*>(ctx->saved_data["group"].toInt());
    auto out_splits = ctx->saved_data["out_splits"].toIntVector();
    auto in_splits = ctx->saved_data["in_splits"].toIntVector();
    auto grad_in = all_to_all_raw(g, grads[0], in_splits, out_splits);
    return {grad_in, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

void moe_dist_free_string(char* s) { std::free(s); }

// Joins the run: a TCPStore client of MASTER_ADDR:MASTER_PORT (rank 0 serves it unless torchrun's
// agent already does), then a Gloo group of `size` ranks.
char* moe_dist_init(const char* host, int port, int rank, int size, int serve_store, const char* prefix,
                    int64_t timeout_ms, Group** out) {
  return guard("init", [&] {
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = serve_store != 0;
    opts.numWorkers = size;
    opts.waitWorkers = false;  // the Gloo rendezvous below waits for every rank (bounded by the timeout)
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::PrefixStore>(prefix, tcp);
    auto* g = new Group{store, make_gloo(c10::make_intrusive<c10d::PrefixStore>("default_pg", store), rank, size, timeout),
                        rank, size, timeout};
    *out = g;
  });
}

// A group of some of `parent`'s ranks (`ranks`, ascending); every rank of the parent calls this in
// the same order; members get their group in *out, the others NULL.
char* moe_dist_subgroup(Group* parent, const int64_t* ranks, int64_t n, Group** out) {
  return guard("subgroup", [&] {
    std::string name = "subgroup_" + std::to_string(parent->subgroups++);
    *out = nullptr;
    for (int64_t i = 0; i < n; ++i) {
      if (ranks[i] == parent->rank) {
        auto store = c10::make_intrusive<c10d::PrefixStore>(name, parent->store);
        *out = new Group{store, make_gloo(store, static_cast<int>(i), static_cast<int>(n), parent->timeout),
                         static_cast<int>(i), static_cast<int>(n), parent->timeout};
      }
    }
  });
}

void moe_dist_free(Group* g) { delete g; }

// Sums (op 0), or takes the max (op 1) of, each tensor across ranks, in place. All are issued
// before any is waited on, so Gloo's threads work on several at once.
char* moe_dist_all_reduce(Group* g, at::Tensor** tensors, int64_t n, int op) {
  return guard("all_reduce", [&] {
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
    opts.timeout = g->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<std::vector<at::Tensor>> args(n);
    for (int64_t i = 0; i < n; ++i) {
      args[i] = {*tensors[i]};
      works.push_back(g->backend->allreduce(args[i], opts));
    }
    for (auto& w : works) wait(w, *g);
  });
}

// Copies `root`'s values of each tensor into every rank's, in place.
char* moe_dist_broadcast(Group* g, at::Tensor** tensors, int64_t n, int root) {
  return guard("broadcast", [&] {
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    opts.timeout = g->timeout;
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    std::vector<std::vector<at::Tensor>> args(n);
    for (int64_t i = 0; i < n; ++i) {
      args[i] = {*tensors[i]};
      works.push_back(g->backend->broadcast(args[i], opts));
    }
    for (auto& w : works) wait(w, *g);
  });
}

char* moe_dist_barrier(Group* g) {
  return guard("barrier", [&] {
    c10d::BarrierOptions opts;
    opts.timeout = g->timeout;
    wait(g->backend->barrier(opts), *g);
  });
}

// Rows of `input` (split by in_splits, one block per rank) go to their ranks; the result holds the
// rows received (out_splits from each rank). With autograd: the backward is the reverse exchange.
char* moe_dist_all_to_all(Group* g, at::Tensor* input, const int64_t* out_splits, const int64_t* in_splits,
                          at::Tensor** out) {
  return guard("all_to_all", [&] {
    auto o = splits(out_splits, g->size), i = splits(in_splits, g->size);
    int64_t sent = 0;
    for (auto s : i) sent += s;
    TORCH_CHECK(input->dim() >= 1 && input->size(0) == sent, "in_splits add up to ", sent, " rows but the input has ",
                input->dim() >= 1 ? input->size(0) : 0);
    at::Tensor result = input->requires_grad()
                            ? AllToAll::apply(*input, reinterpret_cast<int64_t>(g), o, i)
                            : all_to_all_raw(g, *input, o, i);
    *out = new at::Tensor(result);
  });
}

}  // extern "C"
