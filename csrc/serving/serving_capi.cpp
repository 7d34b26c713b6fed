// The hot calls of deepseek_ext.serving.DynamicBatcher as plain C-API functions of deepseek_ext._C, beside the
// torch.classes.deepseek_ext.BatchQueue methods of the same name (batcher_binding.cpp), which own the queue.
//
// Why: a custom-class method call goes through TorchScript's argument matching and always releases and re-takes the
// GIL, about 4-5 us per call. A push holds the queue's mutex for well under a microsecond, so _serving_push keeps the
// GIL (releasing it would only invite a thread switch per request); _serving_next_batch releases it while it waits.
// Lock order is safe: a thread waiting for the queue's mutex without the GIL never needs the GIL while holding it.
//
// The queue is addressed by the handle BatchQueue.handle() returns; the Python caller keeps the BatchQueue object
// alive for as long as it uses the handle.
#include <Python.h>

#include <exception>
#include <stdexcept>

#include "batch_queue.h"

namespace deepseek_ext {
namespace serving {
namespace {

BatchQueue* from_handle(PyObject* h) {
  void* p = PyLong_AsVoidPtr(h);
  if (p == nullptr && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "invalid BatchQueue handle");
  return static_cast<BatchQueue*>(p);
}

PyObject* list_of(const std::vector<int64_t>& v) {
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(v.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < v.size(); ++i) PyList_SET_ITEM(out, i, PyLong_FromLongLong(v[i]));
  return out;
}

// _serving_push(handle, id, group, timeout_s) -> status (0 ok, 1 full, 2 closed)
PyObject* py_push(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "_serving_push(handle, id, group, timeout_s)");
    return nullptr;
  }
  BatchQueue* q = from_handle(args[0]);
  if (q == nullptr) return nullptr;
  const long long id = PyLong_AsLongLong(args[1]);
  const long long group = PyLong_AsLongLong(args[2]);
  const double timeout = PyFloat_AsDouble(args[3]);
  if (PyErr_Occurred()) return nullptr;
  return PyLong_FromLong(static_cast<long>(q->push(id, group, timeout)));
}

// _serving_next_batch(handle, worker, timeout_s, service_s) -> (ids, expired, group, finished); waits without the GIL
PyObject* py_next_batch(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4) {
    PyErr_SetString(PyExc_TypeError, "_serving_next_batch(handle, worker, timeout_s, service_s)");
    return nullptr;
  }
  BatchQueue* q = from_handle(args[0]);
  if (q == nullptr) return nullptr;
  const long long worker = PyLong_AsLongLong(args[1]);
  const double timeout = PyFloat_AsDouble(args[2]);
  const double service = PyFloat_AsDouble(args[3]);
  if (PyErr_Occurred()) return nullptr;
  Batch b;
  const char* error = nullptr;
  std::string message;
  Py_BEGIN_ALLOW_THREADS try {
    b = q->next_batch(worker, timeout, service);
  } catch (const std::exception& e) {
    message = e.what();
    error = message.c_str();
  }
  Py_END_ALLOW_THREADS if (error != nullptr) {
    PyErr_SetString(PyExc_ValueError, error);
    return nullptr;
  }
  return Py_BuildValue("(NNLO)", list_of(b.ids), list_of(b.expired), static_cast<long long>(b.group),
                       b.finished ? Py_True : Py_False);
}

// _serving_reap(handle, timeout_s) -> (expired ids, finished); waits without the GIL
PyObject* py_reap(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "_serving_reap(handle, timeout_s)");
    return nullptr;
  }
  BatchQueue* q = from_handle(args[0]);
  if (q == nullptr) return nullptr;
  const double timeout = PyFloat_AsDouble(args[1]);
  if (PyErr_Occurred()) return nullptr;
  std::vector<int64_t> ids;
  bool finished = false;
  Py_BEGIN_ALLOW_THREADS ids = q->reap(timeout, finished);
  Py_END_ALLOW_THREADS return Py_BuildValue("(NO)", list_of(ids), finished ? Py_True : Py_False);
}

PyMethodDef methods[] = {
    {"_serving_push", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_push)), METH_FASTCALL,
     "_serving_push(handle, id, group, timeout_s) -> status: DynamicBatcher's submit path (keeps the GIL)"},
    {"_serving_next_batch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_next_batch)),
     METH_FASTCALL,
     "_serving_next_batch(handle, worker, timeout_s, service_s) -> (ids, expired, group, finished): waits without "
     "the GIL"},
    {"_serving_reap", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_reap)), METH_FASTCALL,
     "_serving_reap(handle, timeout_s) -> (expired ids, finished): waits for deadlines without the GIL"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

int add_python_functions(PyObject* module) { return PyModule_AddFunctions(module, methods); }

}  // namespace serving
}  // namespace deepseek_ext
