// gradtrace's compiled core: the per-saved-tensor and per-write work of the full level.
//
// Python keeps everything that runs once per step or once per finding; this file holds
// what runs per saved tensor (pack/unpack) and per written tensor (the write observer).
// It produces the same facts as the Python probes (gradtrace/probes/saved.py, writes.py),
// which stay as the reference and the fallback.
//
// NOTE [threads and locks]: pack, unpack and the Packed type's dealloc run with the GIL
// held (autograd calls Python hooks with it). The write observer runs wherever an op runs,
// usually with the GIL released (torch's Python bindings drop it around ops), and on
// autograd's device threads. Every Record field is read and written only under the GIL;
// the registry of live records by storage and the write counts have their own mutexes,
// which are never held while acquiring the GIL (lock order: GIL, then a mutex).
//
// NOTE [observer key]: the observer is a kernel on DispatchKey::TESTING_ONLY_GenericMode,
// registered only on the ops whose schema writes an argument, with a fallthrough for every
// other op: ops that write nothing cost nothing. The key is switched on in this thread's
// included set while tracing (autograd's ThreadLocalState carries it to the engine's
// device threads). The key is meant for tests; it is the one key above autograd that no
// part of torch uses, which is what an observer needs. Checked on torch 2.13 (CPU); the
// Python side refuses to load this core on a torch where the key is missing.

#include <Python.h>
#include <frameobject.h>

#include <ATen/SequenceNumber.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <atomic>
#include <deque>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

constexpr c10::DispatchKey kKey = c10::DispatchKey::TESTING_ONLY_GenericMode;
// Writes kept per saved tensor (gradtrace/probes/saved.py MAX_HITS_PER_SAVED).
constexpr size_t kMaxHits = 4;
// Byte blocks worked out exactly per overlap check (saved.py MAX_BLOCKS).
constexpr int64_t kMaxBlocks = 4096;

enum Phase : int { kForward = 0, kBackward = 1, kOptimizer = 2, kLoop = 3 };

// ---------------------------------------------------------------------------------------
// Python objects kept by the core: references taken and dropped under the GIL.

struct PyRef {
  PyObject* obj = nullptr;
  PyRef() = default;
  explicit PyRef(PyObject* borrowed) : obj(borrowed) { Py_XINCREF(obj); }
  PyRef(const PyRef& other) : obj(other.obj) { Py_XINCREF(obj); }
  PyRef& operator=(const PyRef& other) {
    Py_XINCREF(other.obj);
    Py_XDECREF(obj);
    obj = other.obj;
    return *this;
  }
  ~PyRef() { Py_XDECREF(obj); }
};

// The first user frame behind an op: its code object and the byte offset of the
// instruction; the line is resolved only when a finding or the timeline needs it.
struct Caller {
  PyRef code;
  int lasti = -1;
  int line = -1;  // Python 3.10 has no PyFrame_GetLasti: the line is taken at once there.
};

struct Hit {
  int64_t seq;
  const std::string* op;
  std::string owner;
  int phase;
  int64_t step;
  Caller caller;
};

struct Layout {
  uintptr_t first;
  std::vector<int64_t> sizes;
  std::vector<int64_t> strides;
  int64_t itemsize;
};

using Blocks = std::vector<std::pair<uintptr_t, uintptr_t>>;
using StorageKey = std::pair<int64_t, uintptr_t>;

struct StorageKeyHash {
  size_t operator()(const StorageKey& key) const {
    return std::hash<uintptr_t>()(key.second) ^ (static_cast<size_t>(key.first) << 1);
  }
};

struct Record {
  at::Tensor alias;  // shares storage and version counter with the saved tensor
  // An input the node saved, kept as PyTorch keeps it: PyTorch names the node of an
  // input's current grad_fn in its error, which only the tensor knows (see saved_by_name).
  // Undefined for the node's own output (keeping it would make a reference cycle).
  at::Tensor original;
  const torch::autograd::Node* node_at_pack = nullptr;  // identity only, never dereferenced
  std::string grad_fn;
  int64_t output_nr = 0;
  int64_t version = 0;
  PyRef module;
  int64_t step = 0;
  Caller caller;
  std::vector<std::shared_ptr<Hit>> hits;
  // Writes to other bytes of its buffer that share its version counter (saved.py
  // SavedRecord.shared; NOTE [shared version counter] in analysis/culprits.py).
  std::vector<std::shared_ptr<Hit>> shared;
  bool reported = false;
  bool has_span = false;
  uintptr_t span_first = 0;
  uintptr_t span_last = 0;
  bool has_blocks = false;
  Blocks blocks;
};

// ---------------------------------------------------------------------------------------
// Process state: one tracing session at a time (hooks are global), set by configure().

struct Config {
  PyRef is_user_code;  // code -> bool, asked once per code object
  // self -> module path or None: a module whose code ran outside the module hooks
  // (NOTE [modules that override __call__] in gradtrace/probes/modules.py).
  PyRef owner_of;
  // (seq, op, owner, phase, step, caller, output_of, tensor): a write autograd did not
  // record inside a forward (NOTE [untracked writes] in gradtrace/probes/writes.py).
  PyRef on_untracked;
  // tensor -> None: a tensor that requires grad read out as a Python number
  // (NOTE [graph cuts by read-out] in gradtrace/probes/readouts.py).
  PyRef on_readout;
  PyRef on_check;      // (packed, version_now) -> None; raises for a loud corruption
  PyRef on_traced_write;  // (op, owner, phase, caller) on steps chosen for the timeline
  bool registry = false;  // level "full": live saved tensors are registered by storage
};

// Never destroyed: these hold Python references, and C++ destroys statics after the
// interpreter is gone (a session left running at exit would crash the process there).
Config& config = *new Config();
std::atomic<int64_t> step_now{0};
std::atomic<int64_t> next_seq{0};
std::atomic<bool> trace_all{false};

// NOTE [a core that fails]: an error inside the core's own bookkeeping (out of memory, an
// unexpected tensor) must never reach the user's op. The core then stops its work for the
// rest of the session (ops and packs pass straight through) and keeps the first message for
// Python, which reports the probe as failed (see gradtrace/probes/guard.py).
std::atomic<bool> failed{false};
std::mutex failure_mutex;
std::string failure_message;

void fail(const char* what) {
  std::lock_guard<std::mutex> guard(failure_mutex);
  if (!failed.exchange(true)) {
    failure_message = what;
  }
}

std::unordered_map<PyObject*, bool> user_code;  // code (kept alive) -> verdict; GIL

std::mutex registry_mutex;
auto& registry =
    *new std::unordered_map<StorageKey, std::vector<std::shared_ptr<Record>>, StorageKeyHash>();
std::atomic<int64_t> live_records{0};

// Outputs of the modules run inside the current forward, by storage: what an untracked
// write must not change (NOTE [untracked writes] in gradtrace/probes/writes.py). No Python
// objects: read without the GIL.
struct Activation {
  c10::weak_intrusive_ptr<c10::TensorImpl> tensor;
  std::string path;
  std::vector<std::pair<uintptr_t, uintptr_t>> blocks;
};
std::mutex activations_mutex;
auto& activations =
    *new std::unordered_map<StorageKey, std::vector<Activation>, StorageKeyHash>();
std::atomic<int64_t> activation_count{0};

struct CountKey {
  std::string owner;
  const std::string* op;
  int phase;
  bool operator<(const CountKey& other) const {
    return std::tie(op, phase, owner) < std::tie(other.op, other.phase, other.owner);
  }
};
std::mutex counts_mutex;
std::map<CountKey, int64_t> counts;

// Per thread: what the Python probes publish (module path, optimizer label) and whether
// the observer is inside a write it already saw.
thread_local std::string tl_module;
thread_local PyRef* tl_module_obj = nullptr;
thread_local std::string tl_optimizer;
thread_local int tl_depth = 0;

// ---------------------------------------------------------------------------------------
// Ops: name and written arguments, worked out once per op.

struct OpInfo {
  const std::string* name;  // the overload packet's name ("relu_"), never moved
  size_t num_args;
  std::vector<size_t> written;
};

std::mutex ops_mutex;
std::deque<std::string> op_names;  // grows at the end only: names keep their address
std::unordered_map<const c10::FunctionSchema*, OpInfo> ops;

bool writes(const c10::Argument& argument) {
  const c10::AliasInfo* info = argument.alias_info();
  if (info == nullptr) {
    return false;
  }
  if (info->isWrite()) {
    return true;
  }
  for (const c10::AliasInfo& inner : info->containedTypes()) {
    if (inner.isWrite()) {
      return true;
    }
  }
  return false;
}

std::vector<size_t> written_arguments(const c10::FunctionSchema& schema) {
  std::vector<size_t> written;
  const auto& arguments = schema.arguments();
  for (size_t i = 0; i < arguments.size(); ++i) {
    if (writes(arguments[i])) {
      written.push_back(i);
    }
  }
  return written;
}

const OpInfo& op_info(const c10::OperatorHandle& op) {
  const c10::FunctionSchema* schema = &op.schema();
  std::lock_guard<std::mutex> guard(ops_mutex);
  auto found = ops.find(schema);
  if (found != ops.end()) {
    return found->second;
  }
  std::string name = schema->name();
  auto colons = name.find("::");
  if (colons != std::string::npos) {
    name = name.substr(colons + 2);
  }
  op_names.push_back(name);
  OpInfo info{&op_names.back(), schema->arguments().size(), written_arguments(*schema)};
  return ops.emplace(schema, std::move(info)).first->second;
}

// ---------------------------------------------------------------------------------------
// Memory: which bytes a strided tensor touches (mirrors saved.py byte_blocks).

Layout layout_of(const at::Tensor& tensor) {
  return Layout{
      reinterpret_cast<uintptr_t>(tensor.data_ptr()),
      tensor.sizes().vec(),
      tensor.strides().vec(),
      static_cast<int64_t>(tensor.element_size())};
}

uintptr_t extent_bytes(const Layout& layout) {
  int64_t elements = 1;
  for (size_t i = 0; i < layout.sizes.size(); ++i) {
    elements += (layout.sizes[i] - 1) * layout.strides[i];
  }
  return static_cast<uintptr_t>(elements * layout.itemsize);
}

Blocks byte_blocks(const Layout& layout) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (size_t i = 0; i < layout.sizes.size(); ++i) {
    if (layout.sizes[i] > 1 && layout.strides[i] != 0) {
      dims.emplace_back(layout.strides[i], layout.sizes[i]);
    }
  }
  std::sort(dims.begin(), dims.end());
  int64_t run = 1;
  size_t merged = 0;
  while (merged < dims.size() && dims[merged].first == run) {
    run *= dims[merged].second;
    ++merged;
  }
  int64_t count = 1;
  for (size_t i = merged; i < dims.size(); ++i) {
    count *= dims[i].second;
    if (count > kMaxBlocks) {
      break;
    }
  }
  if (count == 1 || count > kMaxBlocks) {
    return {{layout.first, layout.first + extent_bytes(layout)}};
  }
  std::vector<int64_t> starts{0};
  for (size_t i = merged; i < dims.size(); ++i) {
    std::vector<int64_t> next;
    next.reserve(starts.size() * dims[i].second);
    for (int64_t start : starts) {
      for (int64_t k = 0; k < dims[i].second; ++k) {
        next.push_back(start + k * dims[i].first);
      }
    }
    starts.swap(next);
  }
  uintptr_t length = static_cast<uintptr_t>(run * layout.itemsize);
  Blocks blocks;
  blocks.reserve(starts.size());
  for (int64_t start : starts) {
    uintptr_t first = layout.first + static_cast<uintptr_t>(start * layout.itemsize);
    blocks.emplace_back(first, first + length);
  }
  std::sort(blocks.begin(), blocks.end());
  return blocks;
}

bool blocks_overlap(const Blocks& a, const Blocks& b) {
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    if (a[i].first < b[j].second && b[j].first < a[i].second) {
      return true;
    }
    if (a[i].second <= b[j].second) {
      ++i;
    } else {
      ++j;
    }
  }
  return false;
}

// Under the GIL (Record fields are GIL-protected).
bool overlaps(Record& record, const Layout& write) {
  uintptr_t first = write.first;
  uintptr_t last = first + extent_bytes(write);
  if (!record.has_span) {
    Layout saved = layout_of(record.alias);
    record.span_first = saved.first;
    record.span_last = saved.first + extent_bytes(saved);
    record.has_span = true;
  }
  if (!(first < record.span_last && record.span_first < last)) {
    return false;
  }
  if (!record.has_blocks) {
    record.blocks = byte_blocks(layout_of(record.alias));
    record.has_blocks = true;
  }
  return blocks_overlap(record.blocks, byte_blocks(write));
}

// (device index, storage base address), or false for tensors without addressable memory
// (mirrors _torch_compat.storage_key).
bool storage_key(const at::Tensor& tensor, StorageKey* key) {
  if (!tensor.defined() || tensor.layout() != c10::kStrided || tensor.is_meta() ||
      !tensor.has_storage()) {
    return false;
  }
  const void* base = tensor.storage().data();
  if (base == nullptr) {
    return false;
  }
  *key = {tensor.is_cpu() ? -1 : static_cast<int64_t>(tensor.get_device()),
          reinterpret_cast<uintptr_t>(base)};
  return true;
}

// ---------------------------------------------------------------------------------------
// User frames (GIL held).

bool is_user(PyObject* code) {
  auto found = user_code.find(code);
  if (found != user_code.end()) {
    return found->second;
  }
  bool verdict = false;
  if (config.is_user_code.obj != nullptr) {
    PyObject* result = PyObject_CallOneArg(config.is_user_code.obj, code);
    if (result == nullptr) {
      PyErr_Clear();
    } else {
      verdict = PyObject_IsTrue(result) == 1;
      Py_DECREF(result);
    }
  }
  Py_INCREF(code);
  user_code.emplace(code, verdict);
  return verdict;
}

// The frame's first argument when it is called `self` (a new reference), else null.
PyObject* frame_self(PyFrameObject* frame, PyCodeObject* code) {
#if PY_VERSION_HEX >= 0x030B0000
  if (code->co_argcount == 0) {
    return nullptr;
  }
  PyObject* names = PyCode_GetVarnames(code);
  if (names == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  const bool named_self = PyTuple_Check(names) && PyTuple_GET_SIZE(names) > 0 &&
      PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(names, 0), "self") == 0;
  Py_DECREF(names);
  if (!named_self) {
    return nullptr;
  }
  PyObject* locals = PyFrame_GetLocals(frame);
  if (locals == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  PyObject* self = PyMapping_GetItemString(locals, "self");
  Py_DECREF(locals);
  if (self == nullptr) {
    PyErr_Clear();
  }
  return self;
#else
  (void)frame;
  (void)code;
  return nullptr;
#endif
}

// `self_out`: where to put the user frame's `self` (a new reference or null), for a write
// that hit saved memory; reading a frame's locals is too slow for every saved tensor.
Caller find_caller(PyObject** self_out = nullptr) {
  Caller caller;
  PyThreadState* state = PyThreadState_Get();
  PyFrameObject* frame = PyThreadState_GetFrame(state);
  while (frame != nullptr) {
    PyCodeObject* code = PyFrame_GetCode(frame);
    if (is_user(reinterpret_cast<PyObject*>(code))) {
      caller.code = PyRef(reinterpret_cast<PyObject*>(code));
      if (self_out != nullptr) {
        *self_out = frame_self(frame, code);
      }
#if PY_VERSION_HEX >= 0x030B0000
      caller.lasti = PyFrame_GetLasti(frame);
#else
      caller.line = PyFrame_GetLineNumber(frame);
#endif
      Py_DECREF(code);
      Py_DECREF(frame);
      return caller;
    }
    Py_DECREF(code);
    PyFrameObject* back = PyFrame_GetBack(frame);
    Py_DECREF(frame);
    frame = back;
  }
  return caller;
}

int line_of(Caller& caller) {
  if (caller.line < 0 && caller.code.obj != nullptr && caller.lasti >= 0) {
    caller.line =
        PyCode_Addr2Line(reinterpret_cast<PyCodeObject*>(caller.code.obj), caller.lasti);
  }
  return caller.line;
}

// A new reference: (code, line) or None.
PyObject* caller_tuple(Caller& caller) {
  if (caller.code.obj == nullptr) {
    Py_RETURN_NONE;
  }
  return Py_BuildValue("(Oi)", caller.code.obj, line_of(caller));
}

// ---------------------------------------------------------------------------------------
// Owner and phase of a write (mirrors WriteLogProbe.owner_and_phase).

void owner_and_phase(std::string* owner, int* phase) {
  if (!tl_optimizer.empty()) {
    *owner = tl_optimizer;
    *phase = kOptimizer;
  } else if (!tl_module.empty()) {
    *owner = tl_module;
    *phase = kForward;
  } else if (torch::autograd::get_current_graph_task_id() != -1) {
    auto node = torch::autograd::get_current_node();
    *owner = node ? "backward of " + node->name() : "backward";
    *phase = kBackward;
  } else {
    *owner = "training loop";
    *phase = kLoop;
  }
}

// ---------------------------------------------------------------------------------------
// The write observer.

void gather(const c10::IValue& value, std::vector<at::Tensor>* out) {
  if (value.isTensor()) {
    out->push_back(value.toTensor());
  } else if (value.isTensorList()) {
    for (const at::Tensor& tensor : value.toTensorList()) {
      out->push_back(tensor);
    }
  } else if (value.isList()) {
    for (const c10::IValue& item : value.toListRef()) {
      if (item.isTensor()) {
        out->push_back(item.toTensor());
      }
    }
  }
}

struct GIL {
  PyGILState_STATE state;
  GIL() : state(PyGILState_Ensure()) {}
  ~GIL() { PyGILState_Release(state); }
};

// Whether Python can be entered from this op: not while the interpreter shuts down (ops
// still run then, from destructors and other threads).
bool python_alive() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsInitialized() && !Py_IsFinalizing();
#else
  return Py_IsInitialized() && !_Py_IsFinalizing();
#endif
}

// Live saved tensors on the storages an op is about to write, looked up before it runs:
// a tensor the op itself saves (relu_ saves its result) is not one it overwrote.
using Candidates = std::vector<std::pair<size_t, std::vector<std::shared_ptr<Record>>>>;

Candidates find_candidates(const std::vector<at::Tensor>& written) {
  Candidates candidates;
  std::lock_guard<std::mutex> guard(registry_mutex);
  for (size_t i = 0; i < written.size(); ++i) {
    StorageKey key;
    if (!storage_key(written[i], &key)) {
      continue;
    }
    auto found = registry.find(key);
    if (found != registry.end()) {
      candidates.emplace_back(i, found->second);
    }
  }
  return candidates;
}

// A write that hit saved memory, with the module whose code issued it (NOTE [modules that
// override __call__] in gradtrace/probes/modules.py). GIL held.
std::shared_ptr<Hit> make_hit(const std::string* op, const std::string& owner, int phase) {
  PyObject* self = nullptr;
  const bool ask = (phase == kForward || phase == kLoop) && config.owner_of.obj != nullptr;
  Caller caller = find_caller(ask ? &self : nullptr);
  auto hit = std::make_shared<Hit>(Hit{next_seq++, op, owner, phase, step_now.load(), caller});
  if (self != nullptr) {
    PyObject* inner = PyObject_CallOneArg(config.owner_of.obj, self);
    Py_DECREF(self);
    if (inner == nullptr) {
      PyErr_Clear();
    } else {
      const char* text = PyUnicode_Check(inner) ? PyUnicode_AsUTF8(inner) : nullptr;
      if (text != nullptr) {
        hit->owner = text;
        hit->phase = kForward;
      } else {
        PyErr_Clear();
      }
      Py_DECREF(inner);
    }
  }
  return hit;
}

void attach_hits(
    Candidates& candidates,
    const std::vector<at::Tensor>& written,
    const std::string* op,
    const std::string& owner,
    int phase) {
  GIL gil;
  std::shared_ptr<Hit> hit;
  for (auto& [index, records] : candidates) {
    const at::Tensor& tensor = written[index];
    const Layout layout = layout_of(tensor);
    // After the op ran: a counter the written tensor shares with a saved one reads the same.
    const int64_t version = tensor.is_inference() ? -1 : tensor._version();
    for (auto& record : records) {
      std::vector<std::shared_ptr<Hit>>* found = nullptr;
      if (overlaps(*record, layout)) {
        found = &record->hits;
      } else if (version >= 0 && record->alias._version() == version) {
        found = &record->shared;
      }
      if (found == nullptr || found->size() >= kMaxHits) {
        continue;
      }
      if (!hit) {
        hit = make_hit(op, owner, phase);
      }
      found->push_back(hit);
    }
  }
  // The copies of the records die here, under the GIL (a Record holds Python references).
  candidates.clear();
}

// Drops copies of live records where that is safe: a record's last reference may be one of
// them, and a Record holds Python objects (GIL). While Python shuts down, they are left.
void release(Candidates& candidates) {
  if (candidates.empty()) {
    return;
  }
  if (!python_alive()) {
    new Candidates(std::move(candidates));
    return;
  }
  GIL gil;
  candidates.clear();
}

void hand_to_timeline(const std::string* op, const std::string& owner, int phase) {
  GIL gil;
  if (config.on_traced_write.obj == nullptr) {
    return;
  }
  Caller caller = find_caller();
  PyObject* where = caller_tuple(caller);
  PyObject* result = PyObject_CallFunction(
      config.on_traced_write.obj, "ssiO", op->c_str(), owner.c_str(), phase, where);
  Py_XDECREF(where);
  if (result == nullptr) {
    PyErr_WriteUnraisable(config.on_traced_write.obj);
  }
  Py_XDECREF(result);
}

// The module whose output `tensor` writes into, if any (empty: none).
std::string output_written(const at::Tensor& tensor) {
  StorageKey key;
  if (activation_count.load(std::memory_order_relaxed) == 0 || !storage_key(tensor, &key)) {
    return {};
  }
  const Blocks blocks = byte_blocks(layout_of(tensor));
  std::lock_guard<std::mutex> guard(activations_mutex);
  auto found = activations.find(key);
  if (found == activations.end()) {
    return {};
  }
  for (const Activation& output : found->second) {
    if (!output.tensor.expired() && blocks_overlap(output.blocks, blocks)) {
      return output.path;
    }
  }
  return {};
}

// Hands Python each write inside a forward that autograd did not record, into a module's
// output or a tensor that requires grad (a parameter under no_grad); Python decides.
void check_untracked(
    const OpInfo& info, const std::vector<at::Tensor>& written, const std::string& owner) {
  const bool grad_on = c10::GradMode::is_enabled();
  for (const at::Tensor& tensor : written) {
    if (!tensor.defined() || (grad_on && tensor.requires_grad())) {
      continue;
    }
    const std::string output_of = output_written(tensor);
    if (output_of.empty() && !tensor.requires_grad()) {
      continue;
    }
    GIL gil;
    if (config.on_untracked.obj == nullptr) {
      return;
    }
    auto hit = make_hit(info.name, owner, kForward);
    PyObject* where = caller_tuple(hit->caller);
    PyObject* wrapped = THPVariable_Wrap(tensor);
    PyObject* result = nullptr;
    if (where != nullptr && wrapped != nullptr) {
      result = PyObject_CallFunction(
          config.on_untracked.obj, "LsslLOzO", static_cast<long long>(hit->seq),
          hit->op->c_str(), hit->owner.c_str(), hit->phase,
          static_cast<long long>(hit->step), where,
          output_of.empty() ? nullptr : output_of.c_str(), wrapped);
    }
    Py_XDECREF(where);
    Py_XDECREF(wrapped);
    if (result == nullptr) {
      PyErr_Clear();
    }
    Py_XDECREF(result);
  }
}

void note_write(
    const OpInfo& info, const std::vector<at::Tensor>& written, Candidates& candidates) {
  std::string owner;
  int phase;
  owner_and_phase(&owner, &phase);
  {
    std::lock_guard<std::mutex> guard(counts_mutex);
    ++counts[CountKey{owner, info.name, phase}];
  }
  if (!python_alive()) {
    return;
  }
  if (phase == kForward &&
      (activation_count.load(std::memory_order_relaxed) > 0 || !c10::GradMode::is_enabled())) {
    check_untracked(info, written, owner);
  }
  if (!candidates.empty()) {
    attach_hits(candidates, written, info.name, owner, phase);
  }
  if (trace_all.load(std::memory_order_relaxed)) {
    hand_to_timeline(info.name, owner, phase);
  }
}

// NOTE [the ops a caller issued]: the observer sits above autograd, so it also sees the
// ops that kernels issue themselves: a backward formula's `mm(..., out=)`, `randn`'s
// `normal_` on the tensor it just made. Those are not the program's writes, and the Python
// write log (a dispatch mode, entered around each op the program issues) never sees them.
// They are told apart as PyTorch runs them: a kernel below autograd runs with the autograd
// keys excluded on its thread (AutoDispatchBelowADInplaceOrView), outside inference mode,
// which excludes them for everything; a factory op (no tensor argument, so it never passes
// autograd) is observed too, only to mark what runs inside it; and a write seen marks its
// own inner ops.
bool inside_a_kernel() {
  return tl_depth > 0 ||
      (c10::impl::tls_is_dispatch_key_excluded(c10::DispatchKey::AutogradFunctionality) &&
       !c10::InferenceMode::is_enabled());
}

void enclose(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  ++tl_depth;
  try {
    op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey), stack);
  } catch (...) {
    --tl_depth;
    throw;
  }
  --tl_depth;
}

void observe(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto below = keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey);
  if (failed.load(std::memory_order_relaxed) || inside_a_kernel()) {
    op.redispatchBoxed(below, stack);
    return;
  }
  const OpInfo* info = nullptr;
  std::vector<at::Tensor> written;
  Candidates candidates;
  try {
    info = &op_info(op);
    const size_t base = stack->size() - info->num_args;
    for (size_t position : info->written) {
      gather((*stack)[base + position], &written);
    }
    if (live_records.load(std::memory_order_relaxed) > 0) {
      candidates = find_candidates(written);
    }
  } catch (const std::exception& error) {
    fail(error.what());
    info = nullptr;
  }
  ++tl_depth;
  try {
    op.redispatchBoxed(below, stack);
  } catch (...) {
    --tl_depth;
    release(candidates);
    throw;
  }
  --tl_depth;
  if (info == nullptr) {
    return;
  }
  try {
    note_write(*info, written, candidates);
  } catch (const std::exception& error) {
    fail(error.what());
  }
  release(candidates);
}

// `aten::_local_scalar_dense` (`.item()`, `float()`) and `aten::detach` (`.detach()`,
// `torch.tensor(t)`): a tensor with a grad_fn taken out of the graph is handed to Python with
// the op's name, and Python watches whether backward reaches it (readouts.py).
void observe_readout(
    const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const auto below = keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, kKey);
  if (!failed.load(std::memory_order_relaxed) && !inside_a_kernel() && !stack->empty() &&
      config.on_readout.obj != nullptr && python_alive()) {
    try {
      const c10::IValue& value = stack->back();
      if (value.isTensor() && value.toTensor().grad_fn() != nullptr) {
        const std::string& full = op.schema().name();
        GIL gil;
        PyObject* wrapped = THPVariable_Wrap(value.toTensor());
        PyObject* name = PyUnicode_FromString(full.c_str() + full.find("::") + 2);
        PyObject* result = wrapped == nullptr || name == nullptr
            ? nullptr
            : PyObject_CallFunctionObjArgs(config.on_readout.obj, wrapped, name, nullptr);
        Py_XDECREF(name);
        Py_XDECREF(wrapped);
        if (result == nullptr) {
          PyErr_Clear();
        }
        Py_XDECREF(result);
      }
    } catch (const std::exception& error) {
      fail(error.what());
    }
  }
  ++tl_depth;
  try {
    op.redispatchBoxed(below, stack);
  } catch (...) {
    --tl_depth;
    throw;
  }
  --tl_depth;
}

// An op that makes tensors from nothing: no tensor among its arguments, one among its results.
bool is_factory(const c10::FunctionSchema& schema) {
  for (const c10::Argument& argument : schema.arguments()) {
    if (argument.type()->kind() == c10::TypeKind::TensorType ||
        argument.type()->isSubtypeOf(*c10::ListType::ofTensors()) ||
        argument.type()->isSubtypeOf(*c10::OptionalType::ofTensor())) {
      return false;
    }
  }
  for (const c10::Argument& result : schema.returns()) {
    if (result.type()->kind() == c10::TypeKind::TensorType) {
      return true;
    }
  }
  return false;
}

std::vector<std::unique_ptr<torch::Library>> libraries;

// Registers the observer on every op that writes an argument, and a fallthrough for the
// rest; returns how many ops it observes.
int64_t register_observer() {
  auto fallback = std::make_unique<torch::Library>(
      torch::Library::IMPL, "_", kKey, __FILE__, __LINE__);
  fallback->fallback(torch::CppFunction::makeFallthrough());
  libraries.push_back(std::move(fallback));
  std::map<std::string, torch::Library*> by_namespace;
  int64_t observed = 0;
  for (const c10::OperatorName& name : c10::Dispatcher::singleton().getAllOpNames()) {
    auto handle = c10::Dispatcher::singleton().findOp(name);
    if (!handle || !handle->hasSchema()) {
      continue;
    }
    // detach_ writes autograd's metadata, not memory (no kernel below autograd has it).
    const bool writes_any =
        !written_arguments(handle->schema()).empty() && name.name != "aten::detach_";
    const bool readout = name.overload_name.empty() &&
        (name.name == "aten::_local_scalar_dense" || name.name == "aten::detach");
    if (!writes_any && !readout && !is_factory(handle->schema())) {
      continue;
    }
    const std::string& full = name.name;
    auto colons = full.find("::");
    if (colons == std::string::npos) {
      continue;
    }
    std::string ns = full.substr(0, colons);
    auto found = by_namespace.find(ns);
    if (found == by_namespace.end()) {
      libraries.push_back(std::make_unique<torch::Library>(
          torch::Library::IMPL, ns, kKey, __FILE__, __LINE__));
      found = by_namespace.emplace(ns, libraries.back().get()).first;
    }
    std::string qualified = name.overload_name.empty()
        ? full.substr(colons + 2)
        : full.substr(colons + 2) + "." + name.overload_name;
    if (writes_any) {
      found->second->impl(
          qualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&observe>());
      ++observed;
    } else if (readout) {
      found->second->impl(
          qualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&observe_readout>());
    } else {
      found->second->impl(
          qualified.c_str(), torch::CppFunction::makeFromBoxedFunction<&enclose>());
    }
  }
  return observed;
}

// ---------------------------------------------------------------------------------------
// Saved-tensor hooks: the Packed type autograd keeps for each saved tensor.

struct Packed {
  PyObject_HEAD std::shared_ptr<Record>* record;
  StorageKey key;
  bool registered;
};

void unregister(Packed* packed) {
  if (!packed->registered) {
    return;
  }
  packed->registered = false;
  std::lock_guard<std::mutex> guard(registry_mutex);
  auto found = registry.find(packed->key);
  if (found == registry.end()) {
    return;
  }
  auto& records = found->second;
  for (auto it = records.begin(); it != records.end(); ++it) {
    if (it->get() == packed->record->get()) {
      records.erase(it);
      --live_records;
      break;
    }
  }
  if (records.empty()) {
    registry.erase(found);
  }
}

void packed_dealloc(PyObject* self) {
  auto* packed = reinterpret_cast<Packed*>(self);
  unregister(packed);
  delete packed->record;
  Py_TYPE(self)->tp_free(self);
}

PyObject* packed_info(PyObject* self, PyObject* /*unused*/);
PyObject* packed_mark_reported(PyObject* self, PyObject* /*unused*/);

PyMethodDef packed_methods[] = {
    {"info", packed_info, METH_NOARGS,
     "(tensor, grad_fn, output_nr, version, module, step, caller, hits, reported, shared)"},
    {"mark_reported", packed_mark_reported, METH_NOARGS, "The finding was recorded."},
    {nullptr, nullptr, 0, nullptr}};

PyTypeObject PackedType = {PyVarObject_HEAD_INIT(nullptr, 0)};

// The node PyTorch's own check would name (torch/csrc/autograd/saved_variable.cpp): for a
// tensor the node saved as its own output, that node; for an input, the tensor's grad_fn
// as it is now (after an in-place write, the writing op's node).
// PyTorch says "output 0" for an input, whatever its output_nr: SavedVariable keeps no
// output number for what it saved as the original.
std::string saved_by_name(Record& record, int64_t* output_nr) {
  *output_nr = record.output_nr;
  auto current = torch::autograd::get_current_node();
  if ((current && current.get() == record.node_at_pack) || !record.original.defined()) {
    return record.grad_fn;
  }
  *output_nr = 0;
  const auto& grad_fn = record.original.grad_fn();
  return grad_fn ? grad_fn->name() : std::string();
}

// A new reference: [(seq, op, owner, phase, step, caller)] of these writes.
PyObject* hits_list(std::vector<std::shared_ptr<Hit>>& found) {
  PyObject* hits = PyList_New(0);
  if (hits == nullptr) {
    return nullptr;
  }
  for (auto& hit : found) {
    PyObject* where = caller_tuple(hit->caller);
    PyObject* item = Py_BuildValue(
        "(LsslLO)", static_cast<long long>(hit->seq), hit->op->c_str(),
        hit->owner.c_str(), hit->phase, static_cast<long long>(hit->step), where);
    Py_XDECREF(where);
    if (item == nullptr || PyList_Append(hits, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(hits);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return hits;
}

PyObject* packed_info(PyObject* self, PyObject* /*unused*/) {
  Record& record = **reinterpret_cast<Packed*>(self)->record;
  PyObject* hits = hits_list(record.hits);
  if (hits == nullptr) {
    return nullptr;
  }
  PyObject* shared = hits_list(record.shared);
  if (shared == nullptr) {
    Py_DECREF(hits);
    return nullptr;
  }
  std::string grad_fn;
  int64_t output_nr = record.output_nr;
  try {
    grad_fn = saved_by_name(record, &output_nr);
  } catch (const std::exception&) {
    grad_fn = record.grad_fn;
    output_nr = record.output_nr;
  }
  PyObject* where = caller_tuple(record.caller);
  PyObject* tensor = THPVariable_Wrap(record.alias);
  PyObject* module = record.module.obj != nullptr ? record.module.obj : Py_None;
  PyObject* name = grad_fn.empty() ? Py_NewRef(Py_None) : PyUnicode_FromString(grad_fn.c_str());
  PyObject* result = Py_BuildValue(
      "(NNLLOLNNON)", tensor, name,
      static_cast<long long>(output_nr), static_cast<long long>(record.version),
      module, static_cast<long long>(record.step), where, hits,
      record.reported ? Py_True : Py_False, shared);
  return result;
}

PyObject* packed_mark_reported(PyObject* self, PyObject* /*unused*/) {
  (**reinterpret_cast<Packed*>(self)->record).reported = true;
  Py_RETURN_NONE;
}

// What autograd keeps when the core does no work: a detached alias, as PyTorch's own
// saving would share memory (returning the tensor itself would make a reference cycle).
PyObject* pass_through(PyObject* tensor) {
  return PyObject_CallMethod(tensor, "detach", nullptr);
}

PyObject* pack(PyObject* /*module*/, PyObject* arg) {
  if (!THPVariable_Check(arg)) {
    Py_INCREF(arg);
    return arg;
  }
  if (failed.load(std::memory_order_relaxed)) {
    return pass_through(arg);
  }
  try {
    const at::Tensor& tensor = THPVariable_Unpack(arg);
    // Tensor subclasses (DTensor, FakeTensor) detach through their own Python dispatch;
    // a plain tensor's alias is made without any dispatcher call.
    bool subclass = tensor.key_set().has(c10::DispatchKey::Python);
    at::Tensor alias;
    PyObject* detached = nullptr;
    if (subclass) {
      detached = PyObject_CallMethod(arg, "detach", nullptr);
      if (detached == nullptr) {
        return nullptr;
      }
      alias = THPVariable_Unpack(detached);
    } else {
      alias = tensor.tensor_data();
    }
    if (tensor.is_inference() || tensor.numel() == 0) {
      return detached != nullptr ? detached : THPVariable_Wrap(alias);
    }
    Py_XDECREF(detached);
    auto record = std::make_shared<Record>();
    record->alias = alias;
    const auto& grad_fn = tensor.grad_fn();
    if (grad_fn) {
      record->grad_fn = grad_fn->name();
      record->node_at_pack = grad_fn.get();
    }
    // NOTE [outputs and inputs at pack] in gradtrace/probes/_torch_compat.py: the saving
    // node is the newest on this thread, so a tensor whose grad_fn it is is its output.
    if (!grad_fn || grad_fn->sequence_nr() != at::sequence_number::peek() - 1) {
      record->original = tensor;
    }
    record->output_nr = tensor.output_nr();
    record->version = tensor._version();
    if (tl_module_obj != nullptr) {
      record->module = *tl_module_obj;
    }
    record->step = step_now.load();
    record->caller = find_caller();
    auto* packed = PyObject_New(Packed, &PackedType);
    if (packed == nullptr) {
      return nullptr;
    }
    packed->record = new std::shared_ptr<Record>(std::move(record));
    packed->registered = false;
    if (config.registry && storage_key(tensor, &packed->key)) {
      std::lock_guard<std::mutex> guard(registry_mutex);
      registry[packed->key].push_back(*packed->record);
      packed->registered = true;
      ++live_records;
    }
    return reinterpret_cast<PyObject*>(packed);
  } catch (const std::exception& error) {
    fail(error.what());
    return pass_through(arg);
  }
}

PyObject* unpack(PyObject* /*module*/, PyObject* arg) {
  if (Py_TYPE(arg) != &PackedType) {
    Py_INCREF(arg);
    return arg;
  }
  Record& record = **reinterpret_cast<Packed*>(arg)->record;
  try {
    int64_t now = record.alias._version();
    if ((now != record.version || (!record.hits.empty() && !record.reported)) &&
        config.on_check.obj != nullptr) {
      PyObject* result = PyObject_CallFunction(
          config.on_check.obj, "OL", arg, static_cast<long long>(now));
      if (result == nullptr) {
        return nullptr;
      }
      Py_DECREF(result);
    }
    return THPVariable_Wrap(record.alias);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

// ---------------------------------------------------------------------------------------
// Module functions: what the Python side publishes and drains.

PyObject* configure(PyObject* /*module*/, PyObject* args) {
  PyObject* is_user_code;
  PyObject* on_check;
  int registry_on;
  PyObject* owner_of;
  PyObject* on_untracked;
  PyObject* on_readout;
  if (!PyArg_ParseTuple(
          args, "OOpOOO", &is_user_code, &on_check, &registry_on, &owner_of, &on_untracked,
          &on_readout)) {
    return nullptr;
  }
  config.on_readout = on_readout == Py_None ? PyRef() : PyRef(on_readout);
  config.on_untracked = on_untracked == Py_None ? PyRef() : PyRef(on_untracked);
  config.is_user_code = PyRef(is_user_code);
  config.on_check = PyRef(on_check);
  config.owner_of = owner_of == Py_None ? PyRef() : PyRef(owner_of);
  config.on_traced_write = PyRef();
  config.registry = registry_on != 0;
  step_now = 0;
  Py_RETURN_NONE;
}

PyObject* reset(PyObject* /*module*/, PyObject* /*unused*/) {
  config = Config();
  trace_all = false;
  failed = false;
  // Saved tensors of this session that outlive it (a graph kept in a global) are no longer
  // watched: the next session starts with nothing live, as the Python core does. What the
  // registry held is released after its lock (under the GIL: records hold Python objects).
  std::vector<std::shared_ptr<Record>> dropped;
  {
    std::lock_guard<std::mutex> guard(registry_mutex);
    for (auto& [key, records] : registry) {
      dropped.insert(dropped.end(), records.begin(), records.end());
    }
    registry.clear();
    live_records = 0;
  }
  {
    std::lock_guard<std::mutex> guard(activations_mutex);
    activations.clear();
    activation_count = 0;
  }
  for (auto& [code, verdict] : user_code) {
    Py_DECREF(code);
  }
  user_code.clear();
  {
    std::lock_guard<std::mutex> guard(counts_mutex);
    counts.clear();
  }
  Py_RETURN_NONE;
}

// One output tensor of a module, if it is part of a graph (requires grad, not a leaf).
void add_activation(PyObject* item, const char* path) {
  if (!THPVariable_Check(item)) {
    return;
  }
  const at::Tensor& tensor = THPVariable_Unpack(item);
  StorageKey key;
  if (!tensor.requires_grad() || tensor.is_leaf() || !storage_key(tensor, &key)) {
    return;
  }
  Activation output{
      c10::weak_intrusive_ptr<c10::TensorImpl>(tensor.getIntrusivePtr()), path,
      byte_blocks(layout_of(tensor))};
  std::lock_guard<std::mutex> guard(activations_mutex);
  activations[key].push_back(std::move(output));
  ++activation_count;
}

// (module path, output): a module's output (a tensor, or a tuple or list of them) that an
// untracked write must not change. Called for every module call: no Python work.
PyObject* add_activations(PyObject* /*module*/, PyObject* args) {
  const char* path;
  PyObject* output;
  if (failed.load(std::memory_order_relaxed) ||
      !PyArg_ParseTuple(args, "sO", &path, &output)) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  try {
    if (PyTuple_Check(output) || PyList_Check(output)) {
      PyObject* items = PySequence_Fast(output, "module output");
      if (items == nullptr) {
        PyErr_Clear();
        Py_RETURN_NONE;
      }
      const Py_ssize_t size = PySequence_Fast_GET_SIZE(items);
      for (Py_ssize_t i = 0; i < size; ++i) {
        add_activation(PySequence_Fast_GET_ITEM(items, i), path);
      }
      Py_DECREF(items);
    } else {
      add_activation(output, path);
    }
  } catch (const std::exception& error) {
    fail(error.what());
  }
  Py_RETURN_NONE;
}

PyObject* clear_activations(PyObject* /*module*/, PyObject* /*unused*/) {
  std::lock_guard<std::mutex> guard(activations_mutex);
  activations.clear();
  activation_count = 0;
  Py_RETURN_NONE;
}

PyObject* set_observing(PyObject* /*module*/, PyObject* arg) {
  int on = PyObject_IsTrue(arg);
  if (on < 0) {
    return nullptr;
  }
  bool before = c10::impl::tls_is_dispatch_key_included(kKey);
  c10::impl::tls_set_dispatch_key_included(kKey, on != 0);
  return PyBool_FromLong(before);
}

PyObject* observing(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyBool_FromLong(c10::impl::tls_is_dispatch_key_included(kKey));
}

PyObject* set_hidden(PyObject* /*module*/, PyObject* arg) {
  int on = PyObject_IsTrue(arg);
  if (on < 0) {
    return nullptr;
  }
  bool before = c10::impl::tls_is_dispatch_key_excluded(kKey);
  c10::impl::tls_set_dispatch_key_excluded(kKey, on != 0);
  return PyBool_FromLong(before);
}

PyObject* set_module(PyObject* /*module*/, PyObject* arg) {
  if (arg == Py_None) {
    tl_module.clear();
    delete tl_module_obj;
    tl_module_obj = nullptr;
    Py_RETURN_NONE;
  }
  Py_ssize_t size;
  const char* text = PyUnicode_AsUTF8AndSize(arg, &size);
  if (text == nullptr) {
    return nullptr;
  }
  tl_module.assign(text, static_cast<size_t>(size));
  if (tl_module_obj == nullptr) {
    tl_module_obj = new PyRef(arg);
  } else {
    *tl_module_obj = PyRef(arg);
  }
  Py_RETURN_NONE;
}

PyObject* set_optimizer(PyObject* /*module*/, PyObject* arg) {
  if (arg == Py_None) {
    tl_optimizer.clear();
    Py_RETURN_NONE;
  }
  const char* text = PyUnicode_AsUTF8(arg);
  if (text == nullptr) {
    return nullptr;
  }
  tl_optimizer = text;
  Py_RETURN_NONE;
}

PyObject* set_step(PyObject* /*module*/, PyObject* arg) {
  long long step = PyLong_AsLongLong(arg);
  if (step == -1 && PyErr_Occurred()) {
    return nullptr;
  }
  step_now = step;
  Py_RETURN_NONE;
}

PyObject* trace_writes(PyObject* /*module*/, PyObject* arg) {
  config.on_traced_write = arg == Py_None ? PyRef() : PyRef(arg);
  trace_all = arg != Py_None;
  Py_RETURN_NONE;
}

PyObject* take_counts(PyObject* /*module*/, PyObject* /*unused*/) {
  std::map<CountKey, int64_t> taken;
  {
    std::lock_guard<std::mutex> guard(counts_mutex);
    taken.swap(counts);
  }
  PyObject* result = PyList_New(0);
  if (result == nullptr) {
    return nullptr;
  }
  for (const auto& [key, count] : taken) {
    PyObject* item = Py_BuildValue(
        "(ssiL)", key.owner.c_str(), key.op->c_str(), key.phase,
        static_cast<long long>(count));
    if (item == nullptr || PyList_Append(result, item) < 0) {
      Py_XDECREF(item);
      Py_DECREF(result);
      return nullptr;
    }
    Py_DECREF(item);
  }
  return result;
}

PyObject* failure(PyObject* /*module*/, PyObject* /*unused*/) {
  if (!failed.load()) {
    Py_RETURN_NONE;
  }
  std::lock_guard<std::mutex> guard(failure_mutex);
  return PyUnicode_FromString(failure_message.c_str());
}

PyObject* live_count(PyObject* /*module*/, PyObject* /*unused*/) {
  return PyLong_FromLongLong(live_records.load());
}

PyObject* observe_ops(PyObject* /*module*/, PyObject* /*unused*/) {
  static int64_t observed = -1;
  if (observed < 0) {
    try {
      observed = register_observer();
    } catch (const std::exception& error) {
      PyErr_SetString(PyExc_RuntimeError, error.what());
      return nullptr;
    }
  }
  return PyLong_FromLongLong(observed);
}

PyMethodDef functions[] = {
    {"pack", pack, METH_O, "Saved-tensor pack hook."},
    {"unpack", unpack, METH_O, "Saved-tensor unpack hook."},
    {"configure", configure, METH_VARARGS, "(is_user_code, on_check, registry, owner_of, on_untracked, on_readout)"},
    {"reset", reset, METH_NOARGS, "Forget the session's callbacks, verdicts and counts."},
    {"observe_ops", observe_ops, METH_NOARGS, "Register the write observer (once)."},
    {"add_activations", add_activations, METH_VARARGS,
     "(module path, output): outputs an untracked write must not change."},
    {"clear_activations", clear_activations, METH_NOARGS, "Forget the outputs (new forward)."},
    {"set_observing", set_observing, METH_O, "Observe writes on this thread; -> before."},
    {"observing", observing, METH_NOARGS, "Whether this thread's writes are observed."},
    {"set_hidden", set_hidden, METH_O, "Hide this thread's ops from the observer; -> before."},
    {"set_module", set_module, METH_O, "This thread's running module path, or None."},
    {"set_optimizer", set_optimizer, METH_O, "This thread's stepping optimizer, or None."},
    {"set_step", set_step, METH_O, "The optimizer step in progress."},
    {"trace_writes", trace_writes, METH_O, "Hand every write to this callable (None: stop)."},
    {"take_counts", take_counts, METH_NOARGS, "[(owner, op, phase, count)] since last call."},
    {"failure", failure, METH_NOARGS, "Why the core stopped working this session, or None."},
    {"live_count", live_count, METH_NOARGS, "Saved tensors registered by storage now."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_gradtrace_core", "gradtrace's compiled core.", -1, functions};

}  // namespace

PyMODINIT_FUNC PyInit__gradtrace_core() {
  PackedType.tp_name = "gradtrace._native.Packed";
  PackedType.tp_basicsize = sizeof(Packed);
  PackedType.tp_dealloc = packed_dealloc;
  PackedType.tp_flags = Py_TPFLAGS_DEFAULT;
  PackedType.tp_doc = "A saved tensor as gradtrace keeps it for autograd.";
  PackedType.tp_methods = packed_methods;
  if (PyType_Ready(&PackedType) < 0) {
    return nullptr;
  }
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  PyObject* phases = Py_BuildValue("(ssss)", "forward", "backward", "optimizer", "loop");
  if (phases == nullptr || PyModule_AddObject(module, "PHASES", phases) < 0) {
    Py_XDECREF(phases);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
