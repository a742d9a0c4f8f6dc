// The C++ half of zoo.ops.triton.cxx_launch: launches an already compiled Triton kernel through the CUDA driver's
// cuLaunchKernel, packing its arguments from Python objects without going back into Python; and the dispatch
// layer's call key (zoo.ops._dispatch.call_key), which eager op calls compute before every launch.
//
// Python registers each compiled kernel once (its CUfunction, block size, shared memory and the kind of each
// positional parameter, constexprs included as "skip"); a launch then passes the entry's index, the grid, the stream
// and the kernel's positional arguments. Built with torch's headers (tensors are read through THPVariable) and no
// CUDA headers: the driver entry point is looked up in the already loaded libcuda at the first launch. FastLaunch's
// argument classes (zoo.ops.triton.fast_launch.argument_classes) are computed here too, and the call plans of
// zoo.ops.triton.call_plans (a recorded op call's allocations and launches) are kept and replayed here.
#include <torch/extension.h>
#include <ATen/autocast_mode.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <dlfcn.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <deque>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using LaunchFn = int (*)(void* function, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x,
                         unsigned block_y, unsigned block_z, unsigned shared_bytes, void* stream, void** params,
                         void** extra);

// What a positional kernel argument becomes in the parameter buffer (Triton's signature types, see cxx_launch.py)
enum Kind : int64_t {
  kSkip = 0,     // a constexpr or a specialised constant: not a kernel parameter
  kPointer = 1,  // a tensor: its data pointer
  kI32 = 2,
  kI64 = 3,
  kU32 = 4,
  kU64 = 5,
  kF32 = 6,
  kF64 = 7,
  kI8 = 8,       // i1 / i8 (a bool or a small int)
};

struct Entry {
  void* function;
  unsigned threads;
  unsigned shared_bytes;
  std::vector<int64_t> kinds;
  int64_t params;  // kernel parameters: the non-skip arguments, then `trailing` null scratch pointers
  int64_t trailing;
};

constexpr int64_t kMaxParams = 96;

// Argument checks of the pybind functions raise RuntimeError from a std::runtime_error whose message is joined with
// std::string and std::to_string. On the device machine (torch 2.11 cu130, g++ 13.3) formatting a message with
// c10::str (an ostringstream compiled here), as TORCH_CHECK with values does, segfaulted the process, even when a
// literal message was thrown after it or the exception was caught here; messages joined with std::string raised, and a
// c10::Error formatted inside libtorch was caught here (BENCHMARKS.md, eightieth and eighty-first sessions).
inline std::string message_piece(const char* text) { return text; }
inline std::string message_piece(const std::string& text) { return text; }
template <typename Int, typename = std::enable_if_t<std::is_integral_v<Int>>>
std::string message_piece(Int value) {
  return std::to_string(value);
}

template <typename... Pieces>
std::string joined_message(const Pieces&... pieces) {
  std::string out;
  (out.append(message_piece(pieces)), ...);
  return out;
}

// Throws the joined pieces as a std::runtime_error when `cond` fails.
#define ZOO_CHECK(cond, ...)                                                     \
  do {                                                                           \
    if (!(cond)) throw std::runtime_error(joined_message(__VA_ARGS__).c_str());  \
  } while (false)

std::deque<Entry> entries;  // a deque: registering never moves the entries a launch reads
LaunchFn launch_fn = nullptr;
using ContextFn = int (*)(void** context);
ContextFn context_fn = nullptr;
PyObject* observer = nullptr;  // tests: called with each launch's parameters instead of the driver

// The driver's cuLaunchKernel and cuCtxGetCurrent from the libcuda the process has loaded (torch's CUDA runtime loads
// it); false with a Python error set.
bool load_driver() {
  if (launch_fn != nullptr) return true;
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
  if (lib == nullptr) {
    PyErr_Format(PyExc_RuntimeError, "zoo cxx_launch: libcuda.so.1 cannot be opened: %s", dlerror());
    return false;
  }
  context_fn = reinterpret_cast<ContextFn>(dlsym(lib, "cuCtxGetCurrent"));
  launch_fn = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
  if (launch_fn == nullptr || context_fn == nullptr) {
    launch_fn = nullptr;
    PyErr_SetString(PyExc_RuntimeError, "zoo cxx_launch: no cuLaunchKernel or cuCtxGetCurrent in libcuda");
    return false;
  }
  return true;
}

// The calling thread's current CUDA context (0 while an observer takes the launches); false with a Python error set.
bool current_context(uintptr_t* out) {
  *out = 0;
  if (observer != nullptr) return true;
  if (!load_driver()) return false;
  void* context = nullptr;
  if (context_fn(&context) != 0) context = nullptr;
  *out = reinterpret_cast<uintptr_t>(context);
  return true;
}

int64_t register_kernel(int64_t function, int64_t threads, int64_t shared_bytes, std::vector<int64_t> kinds,
                        int64_t trailing) {
  int64_t params = trailing;
  for (int64_t kind : kinds) {
    ZOO_CHECK(kind >= kSkip && kind <= kI8, "zoo cxx_launch: unknown argument kind ", kind);
    params += kind != kSkip;
  }
  ZOO_CHECK(params <= kMaxParams, "zoo cxx_launch: ", params, " kernel parameters, at most ", kMaxParams);
  entries.push_back(Entry{reinterpret_cast<void*>(function), static_cast<unsigned>(threads),
                          static_cast<unsigned>(shared_bytes), std::move(kinds), params, trailing});
  return static_cast<int64_t>(entries.size()) - 1;
}

// A tensor's data pointer; false where it has none (a tensor without storage, such as a fake one, raises in C++).
bool data_pointer(const at::Tensor& t, const void** out) {
  try {
    *out = t.data_ptr();
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

// Fills slot with the argument's bytes for its kind; false (with a Python error set) when it does not fit.
bool pack(PyObject* arg, int64_t kind, uint64_t* slot) {
  *slot = 0;
  switch (kind) {
    case kPointer: {
      if (!THPVariable_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "zoo cxx_launch: a pointer argument must be a tensor");
        return false;
      }
      const void* data = nullptr;
      if (!data_pointer(THPVariable_Unpack(arg), &data)) {
        PyErr_SetString(PyExc_TypeError, "zoo cxx_launch: a pointer argument's tensor has no data");
        return false;
      }
      *slot = reinterpret_cast<uint64_t>(data);
      return true;
    }
    case kU64: {  // ints from 2**63 on (Triton types them u64)
      unsigned long long value = PyLong_AsUnsignedLongLong(arg);
      if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return false;
      std::memcpy(slot, &value, sizeof value);
      return true;
    }
    case kI32: case kI64: case kU32: case kI8: {
      long long value = PyLong_AsLongLong(arg);  // bools are ints
      if (value == -1 && PyErr_Occurred()) return false;
      if (kind == kI32) { int32_t v = static_cast<int32_t>(value); std::memcpy(slot, &v, sizeof v); }
      else if (kind == kU32) { uint32_t v = static_cast<uint32_t>(value); std::memcpy(slot, &v, sizeof v); }
      else if (kind == kI8) { int8_t v = static_cast<int8_t>(value); std::memcpy(slot, &v, sizeof v); }
      else { std::memcpy(slot, &value, sizeof value); }
      return true;
    }
    case kF32: case kF64: {
      double value = PyFloat_AsDouble(arg);
      if (value == -1.0 && PyErr_Occurred()) return false;
      if (kind == kF32) { float v = static_cast<float>(value); std::memcpy(slot, &v, sizeof v); }
      else { std::memcpy(slot, &value, sizeof value); }
      return true;
    }
    default:
      PyErr_SetString(PyExc_TypeError, "zoo cxx_launch: unknown argument kind");
      return false;
  }
}

// Packs the positional arguments args[0:n] of entry into slots/params; false with a Python error set on failure.
bool pack_all(const Entry& entry, PyObject* const* args, Py_ssize_t n, uint64_t* slots, void** params) {
  if (n != static_cast<Py_ssize_t>(entry.kinds.size())) {
    PyErr_Format(PyExc_TypeError, "zoo cxx_launch: %zd kernel arguments given, the kernel takes %zd", n,
                 static_cast<Py_ssize_t>(entry.kinds.size()));
    return false;
  }
  int64_t p = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t kind = entry.kinds[i];
    if (kind == kSkip) continue;
    if (!pack(args[i], kind, &slots[p])) return false;
    params[p] = &slots[p];
    ++p;
  }
  for (int64_t t = 0; t < entry.trailing; ++t, ++p) {  // global and profile scratch: none
    slots[p] = 0;
    params[p] = &slots[p];
  }
  return true;
}

// The entry args[0] names, given at least `leading` arguments (else a TypeError quoting `usage`); null with a
// Python error set when there is none.
const Entry* entry_of(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t leading, const char* usage) {
  if (nargs < leading) {
    PyErr_Format(PyExc_TypeError, "zoo cxx_launch: %s", usage);
    return nullptr;
  }
  long long index = PyLong_AsLongLong(args[0]);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  if (index < 0 || index >= static_cast<long long>(entries.size())) {
    PyErr_SetString(PyExc_IndexError, "zoo cxx_launch: no kernel registered under this index");
    return nullptr;
  }
  return &entries[index];
}

// Launches entry `index` on the grid with the packed parameters, or hands them to the observer; an empty grid
// launches nothing (as Triton's launcher). False with a Python error set.
bool issue(const Entry& entry, int64_t index, const unsigned long grid[3], void* stream, uint64_t* slots,
           void** params) {
  if (grid[0] * grid[1] * grid[2] == 0) return true;
  if (observer != nullptr) {
    PyObject* bytes = PyBytes_FromStringAndSize(reinterpret_cast<const char*>(slots),
                                                static_cast<Py_ssize_t>(entry.params * sizeof(uint64_t)));
    if (bytes == nullptr) return false;
    PyObject* result = PyObject_CallFunction(observer, "LkkkKN", static_cast<long long>(index), grid[0], grid[1],
                                             grid[2], static_cast<unsigned long long>(
                                                 reinterpret_cast<uintptr_t>(stream)), bytes);
    Py_XDECREF(result);
    return result != nullptr;
  }
  if (!load_driver()) return false;
  int rc;
  // as Triton's launcher: without the GIL, since a launch waits when the device's launch queue is full
  Py_BEGIN_ALLOW_THREADS
  rc = launch_fn(entry.function, static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]),
                 static_cast<unsigned>(grid[2]), entry.threads, 1, 1, entry.shared_bytes, stream, params, nullptr);
  Py_END_ALLOW_THREADS
  if (rc != 0) {
    PyErr_Format(PyExc_RuntimeError, "zoo cxx_launch: cuLaunchKernel failed with CUDA error %d", rc);
    return false;
  }
  return true;
}

// launch(index, grid_x, grid_y, grid_z, stream, *kernel_args) -> None
PyObject* launch(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  const Entry* entry = entry_of(args, nargs, 5, "launch(index, grid_x, grid_y, grid_z, stream, *args)");
  if (entry == nullptr) return nullptr;
  unsigned long grid[3];
  for (int d = 0; d < 3; ++d) {
    grid[d] = PyLong_AsUnsignedLong(args[1 + d]);
    if (grid[d] == static_cast<unsigned long>(-1) && PyErr_Occurred()) return nullptr;
  }
  void* stream = PyLong_AsVoidPtr(args[4]);
  if (stream == nullptr && PyErr_Occurred()) return nullptr;
  uint64_t slots[kMaxParams];
  void* params[kMaxParams];
  if (!pack_all(*entry, args + 5, nargs - 5, slots, params)) return nullptr;
  if (!issue(*entry, PyLong_AsLongLong(args[0]), grid, stream, slots, params)) return nullptr;
  Py_RETURN_NONE;
}

// packed(index, *kernel_args) -> bytes: the parameter buffer a launch would pass, 8 bytes a parameter (tests)
PyObject* packed(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  const Entry* entry = entry_of(args, nargs, 1, "packed(index, *args)");
  if (entry == nullptr) return nullptr;
  uint64_t slots[kMaxParams];
  void* params[kMaxParams];
  if (!pack_all(*entry, args + 1, nargs - 1, slots, params)) return nullptr;
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(slots), entry->params * sizeof(uint64_t));
}

// A tensor's part of a call key: its dims, sizes, strides, dtype, device and requires_grad as bytes (the dims
// first, so that no two metadata give the same bytes); false where the tensor has no plain sizes and strides
// (symbolic, nested, sparse, or a Python subclass that computes them), which then has no key.
bool tensor_key(const at::Tensor& t, std::string* out) {
  c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->has_symbolic_sizes_strides() || impl->is_python_dispatch() || t.is_nested() ||
      t.layout() != at::kStrided) {
    return false;
  }
  const int64_t dim = t.dim();
  out->reserve(8 * (1 + 2 * dim) + 4);
  out->append(reinterpret_cast<const char*>(&dim), sizeof dim);
  out->append(reinterpret_cast<const char*>(t.sizes().data()), sizeof(int64_t) * dim);
  out->append(reinterpret_cast<const char*>(t.strides().data()), sizeof(int64_t) * dim);
  const at::Device device = t.device();
  const char tail[4] = {static_cast<char>(t.scalar_type()), static_cast<char>(device.type()),
                        static_cast<char>(device.index()), static_cast<char>(t.requires_grad())};
  out->append(tail, sizeof tail);
  return true;
}

bool is_key_scalar(PyObject* obj) {  // _dispatch._SCALARS: exact types, as the Python key reads them
  return obj == Py_None || PyBool_Check(obj) || PyLong_CheckExact(obj) || PyFloat_CheckExact(obj) ||
         PyUnicode_CheckExact(obj) || THPDtype_Check(obj);
}

// call_key(*args) -> tuple | None: zoo.ops._dispatch.call_key's key, each tensor's metadata packed as bytes (a bytes
// entry comes only from a tensor, so keys still tell every argument list apart); None where an argument has no key.
PyObject* call_key(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  PyObject* key = PyTuple_New(nargs);
  if (key == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    PyObject* arg = args[i];
    PyObject* item = nullptr;
    if (THPVariable_Check(arg)) {
      std::string bytes;
      if (!tensor_key(THPVariable_Unpack(arg), &bytes)) break;
      item = PyBytes_FromStringAndSize(bytes.data(), static_cast<Py_ssize_t>(bytes.size()));
      if (item == nullptr) { Py_DECREF(key); return nullptr; }
    } else if (is_key_scalar(arg)) {
      Py_INCREF(arg);
      item = arg;
    } else if (PyTuple_CheckExact(arg)) {
      bool scalars = true;
      for (Py_ssize_t j = 0; j < PyTuple_GET_SIZE(arg) && scalars; ++j) {
        scalars = is_key_scalar(PyTuple_GET_ITEM(arg, j));
      }
      if (!scalars) break;
      Py_INCREF(arg);
      item = arg;
    } else {
      break;
    }
    PyTuple_SET_ITEM(key, i, item);
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (PyTuple_GET_ITEM(key, i) == nullptr) {  // an argument without a key
      Py_DECREF(key);
      Py_RETURN_NONE;
    }
  }
  return key;
}

// What Triton's specialisation reads of an int (zoo.ops.triton.fast_launch._int_class): 1 for the value 1, else its
// width (0 int32, 4 int64, 8 uint64) plus 2 when divisible by 16, 3 when not; -1 beyond uint64 (no class).
int int_class(PyObject* obj) {
  int overflow = 0;
  long long value = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow == 0) {
    if (value == 1) return 1;
    int width = (value >= INT32_MIN && value <= INT32_MAX) ? 0 : 4;
    return width + (value % 16 == 0 ? 2 : 3);
  }
  if (overflow < 0) return -1;
  unsigned long long big = PyLong_AsUnsignedLongLong(obj);
  if (big == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    return -1;
  }
  return 8 + (big % 16 == 0 ? 2 : 3);
}

// argument_classes(args: tuple) -> bytes | None: fast_launch.argument_classes's classes, three bytes an argument
// (a tensor: 'T', its dtype, whether it is 16-byte aligned; an int: 'i' and its class; a float, bool or None: its
// type's letter); None where an argument is of another type or a tensor has no data pointer.
PyObject* argument_classes(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1 || !PyTuple_Check(args[0])) {
    PyErr_SetString(PyExc_TypeError, "zoo cxx_launch: argument_classes(args: tuple)");
    return nullptr;
  }
  PyObject* tuple = args[0];
  const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
  std::string out(3 * static_cast<size_t>(n), '\0');
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* arg = PyTuple_GET_ITEM(tuple, i);
    char kind, value = 0, aligned = 0;
    if (THPVariable_Check(arg)) {
      const at::Tensor& t = THPVariable_Unpack(arg);
      const void* data = nullptr;
      if (!data_pointer(t, &data)) Py_RETURN_NONE;
      kind = 'T';
      value = static_cast<char>(t.scalar_type());
      aligned = (reinterpret_cast<uintptr_t>(data) & 15) == 0;
    } else if (PyBool_Check(arg)) {
      kind = 'b';
    } else if (PyLong_CheckExact(arg)) {
      int cls = int_class(arg);
      if (cls < 0) Py_RETURN_NONE;
      kind = 'i';
      value = static_cast<char>(cls);
    } else if (PyFloat_CheckExact(arg)) {
      kind = 'f';
    } else if (arg == Py_None) {
      kind = 'n';
    } else {
      Py_RETURN_NONE;
    }
    out[3 * i] = kind;
    out[3 * i + 1] = value;
    out[3 * i + 2] = aligned;
  }
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

// ---- call plans (zoo.ops.triton.call_plans): an eager op call's allocations and launches, recorded once in Python
// and replayed here for later calls with the same call key.

enum Source : int64_t {
  kConstant = 0,       // a scalar (or a scratch pointer): its packed bytes
  kInputPointer = 1,   // a tensor found in the call's arguments: an argument's data pointer plus a byte offset
  kBufferPointer = 2,  // a tensor the call allocated: a buffer's data pointer plus a byte offset
};

struct Reference {
  int64_t index;   // the argument's or the buffer's position
  int64_t offset;  // bytes from its data pointer
};

struct Param {
  int64_t source;
  uint64_t bits;                      // kConstant
  std::vector<Reference> references;  // every argument the pointer lay in when recorded (all must agree), or the
                                      // one buffer
  bool aligned;                       // 16-byte aligned when recorded: the kernel was specialised on it
};

struct PlanLaunch {
  int64_t entry;
  unsigned long grid[3];
  std::vector<Param> params;  // the kernel's parameters, trailing scratch pointers included
};

struct Buffer {
  std::vector<int64_t> sizes, strides;
  at::TensorOptions options;
};

struct Output {
  int64_t buffer;  // -1: None
  std::vector<int64_t> sizes, strides;
  int64_t offset;  // elements past the buffer's own storage offset
  bool whole;      // the buffer itself
};

struct Plan {
  bool live = false;
  int autocast = -1;  // CUDA autocast's dtype when recorded, -1 off: a backend may read it (a weight cast, say)
  Py_ssize_t inputs = 0;
  uintptr_t context = 0;
  PyObject* stream_fn = nullptr;  // stream_fn(device) -> the current stream's handle
  PyObject* device = nullptr;
  std::vector<Buffer> buffers;
  std::vector<PlanLaunch> launches;
  std::vector<Output> outputs;
  bool as_tuple = false;
};

constexpr Py_ssize_t kMaxInputs = 64;

int cuda_autocast() {
  return at::autocast::is_autocast_enabled(at::kCUDA) ? static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA))
                                                      : -1;
}

std::deque<Plan> plans;  // a deque: registering never moves a plan a replay reads
std::vector<int64_t> free_plans;

// A kernel parameter of a plan from its recorded positional argument: a pointer argument is given as
// (source, aligned, ((index, offset), ...)), anything else as the scalar it was.
Param plan_param(const py::handle& arg, int64_t kind) {
  Param param{kConstant, 0, {}, false};
  if (kind != kPointer) {
    if (!pack(arg.ptr(), kind, &param.bits)) {
      PyErr_Clear();
      ZOO_CHECK(false, "zoo call plan: ", py::repr(arg).cast<std::string>(), " does not fit its kernel parameter");
    }
    return param;
  }
  auto spec = py::cast<py::tuple>(arg);
  ZOO_CHECK(spec.size() == 3, "zoo call plan: a pointer is (source, aligned, references)");
  param.source = spec[0].cast<int64_t>();
  param.aligned = spec[1].cast<bool>();
  for (const auto& ref : spec[2]) {
    auto pair = py::cast<py::tuple>(ref);
    param.references.push_back(Reference{pair[0].cast<int64_t>(), pair[1].cast<int64_t>()});
  }
  ZOO_CHECK((param.source == kInputPointer && !param.references.empty()) ||
                (param.source == kBufferPointer && param.references.size() == 1),
            "zoo call plan: a pointer comes from arguments or from one buffer");
  return param;
}

// register_plan(...) -> index for replay(index, *arguments). buffers: the tensors the call allocated (their sizes,
// strides, dtype and device are read); launches: (entry, grid, the kernel's positional arguments, pointers as
// plan_param reads them); outputs: (buffer or -1 for None, sizes, strides, elements past the buffer's offset).
int64_t register_plan(int64_t inputs, int64_t context, py::object stream_fn, py::object device,
                      const std::vector<at::Tensor>& buffers,
                      const std::vector<std::tuple<int64_t, std::vector<int64_t>, py::list>>& launches,
                      const std::vector<std::tuple<int64_t, std::vector<int64_t>, std::vector<int64_t>, int64_t>>&
                          outputs,
                      bool as_tuple) {
  ZOO_CHECK(inputs >= 0 && inputs <= kMaxInputs, "zoo call plan: ", inputs, " arguments, at most ", kMaxInputs);
  Plan plan;
  plan.inputs = inputs;
  plan.context = static_cast<uintptr_t>(context);
  plan.autocast = cuda_autocast();
  for (const at::Tensor& t : buffers) {
    plan.buffers.push_back(Buffer{t.sizes().vec(), t.strides().vec(), t.options()});
  }
  for (const auto& [index, grid, args] : launches) {
    ZOO_CHECK(index >= 0 && index < static_cast<int64_t>(entries.size()), "zoo call plan: no kernel ", index);
    ZOO_CHECK(grid.size() == 3, "zoo call plan: a grid has three sizes");
    const Entry& entry = entries[index];
    ZOO_CHECK(args.size() == entry.kinds.size(), "zoo call plan: ", args.size(), " kernel arguments, the kernel "
              "takes ", entry.kinds.size());
    PlanLaunch launch{index, {static_cast<unsigned long>(grid[0]), static_cast<unsigned long>(grid[1]),
                              static_cast<unsigned long>(grid[2])}, {}};
    for (size_t i = 0; i < args.size(); ++i) {
      if (entry.kinds[i] == kSkip) continue;
      Param param = plan_param(args[i], entry.kinds[i]);
      for (const Reference& ref : param.references) {
        const int64_t limit = param.source == kInputPointer ? inputs : static_cast<int64_t>(buffers.size());
        ZOO_CHECK(ref.index >= 0 && ref.index < limit, "zoo call plan: a pointer's reference is out of range");
      }
      launch.params.push_back(std::move(param));
    }
    for (int64_t t = 0; t < entry.trailing; ++t) launch.params.push_back(Param{kConstant, 0, {}, false});
    plan.launches.push_back(std::move(launch));
  }
  for (const auto& [buffer, sizes, strides, offset] : outputs) {
    ZOO_CHECK(buffer >= -1 && buffer < static_cast<int64_t>(buffers.size()), "zoo call plan: no buffer ", buffer);
    bool whole = buffer >= 0 && offset == 0 && sizes == plan.buffers[buffer].sizes &&
                 strides == plan.buffers[buffer].strides;
    plan.outputs.push_back(Output{buffer, sizes, strides, offset, whole});
  }
  ZOO_CHECK(as_tuple || plan.outputs.size() == 1, "zoo call plan: one output unless a tuple");
  plan.as_tuple = as_tuple;
  plan.stream_fn = stream_fn.release().ptr();
  plan.device = device.release().ptr();
  plan.live = true;
  if (!free_plans.empty()) {
    int64_t slot = free_plans.back();
    free_plans.pop_back();
    plans[slot] = std::move(plan);
    return slot;
  }
  plans.push_back(std::move(plan));
  return static_cast<int64_t>(plans.size()) - 1;
}

// release_plan(index): forget a plan (its slot is reused).
void release_plan(int64_t index) {
  ZOO_CHECK(index >= 0 && index < static_cast<int64_t>(plans.size()) && plans[index].live,
            "zoo call plan: no plan ", index);
  Plan& plan = plans[index];
  Py_XDECREF(plan.stream_fn);
  Py_XDECREF(plan.device);
  plan = Plan();
  free_plans.push_back(index);
}

// The pointer a kInputPointer parameter takes from this call's argument pointers: false where an argument has none,
// the arguments it was found in no longer agree, or its alignment differs from the recorded one.
bool input_pointer(const Param& param, const uintptr_t* pointers, uint64_t* out) {
  const Reference& first = param.references[0];
  if (pointers[first.index] == 0) return false;
  const uint64_t value = pointers[first.index] + first.offset;
  for (size_t r = 1; r < param.references.size(); ++r) {
    const Reference& other = param.references[r];
    if (pointers[other.index] == 0 || pointers[other.index] + other.offset != value) return false;
  }
  *out = value;
  return ((value & 15) == 0) == param.aligned;
}

PyObject* plan_outputs(const Plan& plan, const std::vector<at::Tensor>& buffers) {
  auto wrap = [&](const Output& out) -> PyObject* {
    if (out.buffer < 0) Py_RETURN_NONE;
    const at::Tensor& buffer = buffers[out.buffer];
    if (out.whole) return THPVariable_Wrap(buffer);
    return THPVariable_Wrap(buffer.as_strided(out.sizes, out.strides, buffer.storage_offset() + out.offset));
  };
  if (!plan.as_tuple) return wrap(plan.outputs[0]);
  PyObject* tuple = PyTuple_New(static_cast<Py_ssize_t>(plan.outputs.size()));
  if (tuple == nullptr) return nullptr;
  for (size_t i = 0; i < plan.outputs.size(); ++i) {
    PyObject* item = wrap(plan.outputs[i]);
    if (item == nullptr) {
      Py_DECREF(tuple);
      return nullptr;
    }
    PyTuple_SET_ITEM(tuple, static_cast<Py_ssize_t>(i), item);
  }
  return tuple;
}

// replay(index, *arguments) -> the op's output, or None where this call cannot be replayed (another current
// context or CUDA autocast state, an argument pointer that no longer agrees with the others or changed alignment):
// nothing was allocated or launched then. The arguments are the op's, in the recorded order.
PyObject* replay(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS  // an allocation that fails (out of memory) raises torch's Python error
  if (nargs < 1) {
    PyErr_SetString(PyExc_TypeError, "zoo call plan: replay(index, *arguments)");
    return nullptr;
  }
  const long long index = PyLong_AsLongLong(args[0]);
  if (index == -1 && PyErr_Occurred()) return nullptr;
  if (index < 0 || index >= static_cast<long long>(plans.size()) || !plans[index].live) {
    PyErr_SetString(PyExc_IndexError, "zoo call plan: no plan under this index");
    return nullptr;
  }
  const Plan& plan = plans[index];
  if (nargs - 1 != plan.inputs) {
    PyErr_Format(PyExc_TypeError, "zoo call plan: %zd arguments given, the plan takes %zd", nargs - 1, plan.inputs);
    return nullptr;
  }
  uintptr_t context;
  if (!current_context(&context)) return nullptr;
  if (context != plan.context || cuda_autocast() != plan.autocast) Py_RETURN_NONE;
  uintptr_t pointers[kMaxInputs];
  for (Py_ssize_t i = 0; i < plan.inputs; ++i) {
    pointers[i] = 0;
    const void* data = nullptr;
    if (THPVariable_Check(args[1 + i]) && data_pointer(THPVariable_Unpack(args[1 + i]), &data)) {
      pointers[i] = reinterpret_cast<uintptr_t>(data);
    }
  }
  std::vector<uint64_t> resolved;  // the input pointers, checked before anything is allocated or launched
  for (const PlanLaunch& launch : plan.launches) {
    for (const Param& param : launch.params) {
      if (param.source != kInputPointer) continue;
      uint64_t value;
      if (!input_pointer(param, pointers, &value)) Py_RETURN_NONE;
      resolved.push_back(value);
    }
  }
  std::vector<at::Tensor> buffers;
  buffers.reserve(plan.buffers.size());
  for (const Buffer& buffer : plan.buffers) buffers.push_back(at::empty_strided(buffer.sizes, buffer.strides,
                                                                                 buffer.options));
  PyObject* handle = PyObject_CallOneArg(plan.stream_fn, plan.device);
  if (handle == nullptr) return nullptr;
  void* stream = PyLong_AsVoidPtr(handle);
  Py_DECREF(handle);
  if (stream == nullptr && PyErr_Occurred()) return nullptr;
  size_t next = 0;
  for (const PlanLaunch& launch : plan.launches) {
    uint64_t slots[kMaxParams];
    void* params[kMaxParams];
    size_t p = 0;
    for (const Param& param : launch.params) {
      if (param.source == kConstant) {
        slots[p] = param.bits;
      } else if (param.source == kInputPointer) {
        slots[p] = resolved[next++];
      } else {
        const Reference& ref = param.references[0];
        slots[p] = reinterpret_cast<uint64_t>(buffers[ref.index].data_ptr()) + ref.offset;
      }
      params[p] = &slots[p];
      ++p;
    }
    if (!issue(entries[launch.entry], launch.entry, launch.grid, stream, slots, params)) return nullptr;
  }
  return plan_outputs(plan, buffers);
  END_HANDLE_TH_ERRORS
}

// set_launch_observer(fn | None): tests on machines without a GPU; fn(index, grid_x, grid_y, grid_z, stream,
// parameters: bytes) is called for each launch instead of the driver, and the current context reads 0.
PyObject* set_launch_observer(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 1) {
    PyErr_SetString(PyExc_TypeError, "zoo cxx_launch: set_launch_observer(fn | None)");
    return nullptr;
  }
  Py_XDECREF(observer);
  observer = args[0] == Py_None ? nullptr : args[0];
  Py_XINCREF(observer);
  Py_RETURN_NONE;
}

// current_context() -> int: the calling thread's current CUDA context (0: none, or an observer is set).
PyObject* context_of_thread(PyObject* /*self*/, PyObject* const* /*args*/, Py_ssize_t /*nargs*/) {
  uintptr_t context;
  if (!current_context(&context)) return nullptr;
  return PyLong_FromUnsignedLongLong(context);
}

PyMethodDef methods[] = {
    {"argument_classes", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(argument_classes)), METH_FASTCALL,
     "argument_classes(args: tuple) -> bytes | None: fast_launch.argument_classes, three bytes an argument"},
    {"call_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(call_key)), METH_FASTCALL,
     "call_key(*args) -> tuple | None: the dispatch layer's call key, tensors' metadata packed as bytes"},
    {"launch", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(launch)), METH_FASTCALL,
     "launch(index, grid_x, grid_y, grid_z, stream, *args): launch a registered kernel"},
    {"packed", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(packed)), METH_FASTCALL,
     "packed(index, *args) -> bytes: the parameter buffer of a launch, 8 bytes a parameter"},
    {"replay", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(replay)), METH_FASTCALL,
     "replay(index, *arguments): an op call's allocations and launches from its plan, or None"},
    {"set_launch_observer", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(set_launch_observer)),
     METH_FASTCALL, "set_launch_observer(fn | None): launches go to fn instead of the driver (tests)"},
    {"current_context", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(context_of_thread)), METH_FASTCALL,
     "current_context() -> int: the thread's current CUDA context"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("register_kernel", &register_kernel, "register a compiled kernel; returns its index");
  m.def("register_plan", &register_plan, "register an op call's plan; returns its index for replay");
  m.def("release_plan", &release_plan, "forget a plan");
  ZOO_CHECK(PyModule_AddFunctions(m.ptr(), methods) == 0, "zoo cxx_launch: cannot add the launch functions");
}
