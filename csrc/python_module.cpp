// tokenkernels._C: importing it runs the TORCH_LIBRARY registrations linked into this module.
// It defines no Python functions of its own, so it needs no pybind11 or libtorch_python.
#include <Python.h>

static struct PyModuleDef tk_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "tokenkernels native ops (registered as torch.ops.tokenkernels)",
                                       -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&tk_module); }
