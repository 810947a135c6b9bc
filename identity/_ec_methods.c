/* The pkey-methods callback of identity/openssl_engine.py's ENGINE, in C.
 *
 * OpenSSL calls it for every EC operation, in the middle of handshakes that run
 * without the GIL; a Python (ctypes) callback would take the GIL back each time,
 * and wait there for up to the switch interval behind any busy thread. This one
 * holds no Python object and calls nothing: it hands OpenSSL the one method it was
 * given, for EC keys only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#define NID_X9_62_id_ecPublicKey 408

static void *ec_method; /* OpenSSL's built-in EVP_PKEY_METHOD for EC keys */
static const int ec_nids[] = {NID_X9_62_id_ecPublicKey};

/* ENGINE_PKEY_METHS_PTR (engine.h): int (*)(ENGINE *, EVP_PKEY_METHOD **,
 * const int **nids, int nid) */
static int
pkey_methods(void *engine, void **method, const int **nids, int nid)
{
    (void)engine;
    if (method == NULL) { /* which key types it has: asked at registration */
        *nids = ec_nids;
        return 1;
    }
    if (nid == NID_X9_62_id_ecPublicKey && ec_method != NULL) {
        *method = ec_method;
        return 1;
    }
    *method = NULL;
    return 0;
}

static PyObject *
set_method(PyObject *module, PyObject *method)
{
    (void)module;
    /* An address: not an int, negative or beyond 64 bits is an error here */
    unsigned long long address = PyLong_AsUnsignedLongLong(method);
    if (PyErr_Occurred())
        return NULL;
    void *given = (void *)(uintptr_t)address;
    if (given == NULL || (unsigned long long)(uintptr_t)given != address) {
        PyErr_SetString(PyExc_ValueError, "the EC method must be an address");
        return NULL;
    }
    if (ec_method != NULL && ec_method != given) { /* OpenSSL may be reading it now */
        PyErr_SetString(PyExc_ValueError, "the EC method is set already, to another");
        return NULL;
    }
    ec_method = given;
    Py_RETURN_TRUE;
}

static PyObject *
callback(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    return PyLong_FromVoidPtr((void *)pkey_methods);
}

static PyMethodDef methods[] = {
    {"set_method", set_method, METH_O,
     "set_method(ec_method: int) -> True\n\n"
     "The EVP_PKEY_METHOD (its address) the callback answers EC keys (NID 408)\n"
     "with. Set once: another address later is a ValueError."},
    {"callback", callback, METH_NOARGS,
     "callback() -> int\n\nThe address of the engine's pkey-methods callback."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "identity._ec_methods",
    "The C callback of identity.openssl_engine's ENGINE.", -1, methods,
};

PyMODINIT_FUNC
PyInit__ec_methods(void)
{
    return PyModule_Create(&module);
}
