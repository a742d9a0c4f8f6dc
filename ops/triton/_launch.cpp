// The C++ half of zoo.ops.triton.cxx_launch: launches an already compiled Triton kernel through the CUDA driver's
// cuLaunchKernel, packing its arguments from Python objects without going back into Python; and the dispatch
// layer's call key (zoo.ops._dispatch.call_key), which eager op calls compute before every launch.
//
// Python registers each compiled kernel once (its CUfunction, block size, shared memory and the kind of each
// positional parameter, constexprs included as "skip"); a launch then passes the entry's index, the grid, the stream
// and the kernel's positional arguments. Built with torch's headers (tensors are read through THPVariable) and no
// CUDA headers: the driver entry point is looked up in the already loaded libcuda at the first launch. FastLaunch's
// argument classes (zoo.ops.triton.fast_launch.argument_classes) are computed here too.
#include <torch/extension.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/autograd/python_variable.h>

#include <dlfcn.h>

#include <climits>
#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
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

std::deque<Entry> entries;  // a deque: registering never moves the entries a launch reads
LaunchFn launch_fn = nullptr;

// The driver's cuLaunchKernel from the libcuda the process has loaded (torch's CUDA runtime loads it), or null
// with a Python error set.
LaunchFn driver_launch() {
  if (launch_fn == nullptr) {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    if (lib == nullptr) {
      PyErr_Format(PyExc_RuntimeError, "zoo cxx_launch: libcuda.so.1 cannot be opened: %s", dlerror());
      return nullptr;
    }
    launch_fn = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
    if (launch_fn == nullptr) PyErr_SetString(PyExc_RuntimeError, "zoo cxx_launch: no cuLaunchKernel in libcuda");
  }
  return launch_fn;
}

int64_t register_kernel(int64_t function, int64_t threads, int64_t shared_bytes, std::vector<int64_t> kinds,
                        int64_t trailing) {
  int64_t params = trailing;
  for (int64_t kind : kinds) {
    TORCH_CHECK(kind >= kSkip && kind <= kI8, "zoo cxx_launch: unknown argument kind ", kind);
    params += kind != kSkip;
  }
  TORCH_CHECK(params <= kMaxParams, "zoo cxx_launch: ", params, " kernel parameters, at most ", kMaxParams);
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
  if (grid[0] * grid[1] * grid[2] == 0) Py_RETURN_NONE;  // as Triton's launcher: an empty grid launches nothing
  if (driver_launch() == nullptr) return nullptr;
  int rc;
  // as Triton's launcher: without the GIL, since a launch waits when the device's launch queue is full
  Py_BEGIN_ALLOW_THREADS
  rc = launch_fn(entry->function, static_cast<unsigned>(grid[0]), static_cast<unsigned>(grid[1]),
                 static_cast<unsigned>(grid[2]), entry->threads, 1, 1, entry->shared_bytes, stream, params, nullptr);
  Py_END_ALLOW_THREADS
  if (rc != 0) {
    PyErr_Format(PyExc_RuntimeError, "zoo cxx_launch: cuLaunchKernel failed with CUDA error %d", rc);
    return nullptr;
  }
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

PyMethodDef methods[] = {
    {"argument_classes", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(argument_classes)), METH_FASTCALL,
     "argument_classes(args: tuple) -> bytes | None: fast_launch.argument_classes, three bytes an argument"},
    {"call_key", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(call_key)), METH_FASTCALL,
     "call_key(*args) -> tuple | None: the dispatch layer's call key, tensors' metadata packed as bytes"},
    {"launch", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(launch)), METH_FASTCALL,
     "launch(index, grid_x, grid_y, grid_z, stream, *args): launch a registered kernel"},
    {"packed", reinterpret_cast<PyCFunction>(reinterpret_cast<void*>(packed)), METH_FASTCALL,
     "packed(index, *args) -> bytes: the parameter buffer of a launch, 8 bytes a parameter"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("register_kernel", &register_kernel, "register a compiled kernel; returns its index");
  TORCH_CHECK(PyModule_AddFunctions(m.ptr(), methods) == 0, "zoo cxx_launch: cannot add the launch functions");
}
