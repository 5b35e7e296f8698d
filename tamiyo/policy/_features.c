/* The per-signal part of the featurizer (telemetry_features.py, FEATURE_SCHEMA "node-v1")
 * in C.
 *
 * Why: featurize_many computes the telemetry features of a batch in ~70 numpy calls of
 * ~5-7 us each, whatever the batch size; a lone graph, the common case of a server that is
 * not swamped, costs ~0.4 ms there, ten times the native forward of the same graph
 * (fused.py). Here each node is one pass over its window (W slots), in one call per
 * batch. This is a rendering of the numpy code in telemetry_features.py, not a second
 * definition: telemetry_features.py passes every column index, field index and constant
 * (``_native_plan``), tests/policy/test_features_native.py compares the two on random
 * snapshots (hypothesis), and featurize_many (``telemetry_columns``) checks them against
 * each other once per process before using this.
 *
 * Arithmetic as numpy does it: log1p of float64, divided, then rounded to float32; means,
 * slopes and fractions in float64; the health trend is the least-squares slope of health
 * against step over the valid slots.
 *
 * Entry point: dynamic(plan, scales, statics, valid, floats, ints, steps, slen, states,
 *                      seeds, step, has_kernels) -> (x, target, health, free_seed)
 *   plan    int64 [P_COUNT]  column and field indices (see enum below)
 *   scales  float64 [S_COUNT]  divisors and constants (see enum below)
 *   eight lists with one array per graph g (n_g nodes, window W):
 *     statics float32 [n_g, F] (the topology's columns, copied into x first); valid bool
 *     [n_g, W]; floats float32 [n_g, W, NF]; ints int64 [n_g, W, NI]; steps int64 [n_g, W];
 *     slen int64 [n_g, W] (seed-state list length); states uint8 [n_g, W, 64];
 *     seeds int64 [n_g] (seed count per layer)
 *   step int64 [B] (each graph's current step); has_kernels bool [B]
 *   returns x float32 [N, F], target bool [N], health float32 [N] (NaN = no telemetry),
 *   free_seed int64 [N] (-1 = none), N = sum n_g.
 * It keeps the GIL (~1 us per node; the caller is the server's event loop or a trainer).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_SEEDS 64
#define N_LOG_F 4
#define N_COPY_F 3
#define N_STATES 5 /* seed-state codes 1..5 */

/* plan: x columns written, then the signal fields they read. */
enum {
    P_LOG_F,                       /* N_LOG_F columns: log-scaled newest floats */
    P_COPY_F = P_LOG_F + N_LOG_F,  /* N_COPY_F columns: newest floats as they are */
    P_STATES = P_COPY_F + N_COPY_F, /* N_STATES columns: fraction per seed state */
    P_ERR = P_STATES + N_STATES,
    P_ERR_WINDOW,
    P_ADAPT,
    P_HAS,
    P_STALE,
    P_AGE,
    P_FILL,
    P_H_LATEST,
    P_H_MEAN,
    P_H_MIN,
    P_H_TREND,
    P_ACTIVE_FRAC,
    P_FREE_FRAC,
    P_HAS_FREE,
    P_SRC_LOG_F, /* N_LOG_F float-field indices */
    P_SRC_COPY_F = P_SRC_LOG_F + N_LOG_F,
    P_F_HEALTH = P_SRC_COPY_F + N_COPY_F,
    P_I_ERR,
    P_I_ACTIVE,
    P_I_TOTAL,
    P_I_ADAPT,
    P_STALE_AFTER, /* steps */
    P_NF,          /* float fields per signal */
    P_NI,          /* int fields per signal */
    P_COUNT
};

/* scales: divisors of the log1p columns, then constants. */
enum { S_LOG_F, S_ERR = S_LOG_F + N_LOG_F, S_ERR_WINDOW, S_ADAPT, S_AGE, S_TREND, S_COUNT };

enum { A_STATIC, A_VALID, A_FLOATS, A_INTS, A_STEPS, A_SLEN, A_STATES, A_SEEDS, NA };
static const char *const NAME[NA] = {"statics", "valid",          "floats",      "ints",
                                     "steps",   "seed_state_len", "seed_states", "seed_counts"};
static const int TYPE[NA] = {NPY_FLOAT32, NPY_BOOL,  NPY_FLOAT32, NPY_INT64,
                             NPY_INT64,   NPY_INT64, NPY_UINT8,   NPY_INT64};
static const int NDIM[NA] = {2, 2, 3, 3, 2, 2, 3, 1};

static inline double logscaled(double v, double scale) { return log1p(v > 0 ? v : 0.0) / scale; }

/* A strided array (byte strides, any order): the server's window arrays are fields of
 * one record array, read in place rather than copied. */
typedef struct {
    const char *p;
    npy_intp s[3];
} Arr;

#define AT(type, a, i, j, k) (*(const type *)((a).p + (i) * (a).s[0] + (j) * (a).s[1] + (k) * (a).s[2]))

/* Node i's row of x and its target / health / free seed (see telemetry_features.py). */
static void node(const int64_t *P, const double *S, int W, int64_t step, int has_kernels,
                 npy_intp i, const Arr *A, float *x, uint8_t *target, float *health,
                 int64_t *free_seed)
{
    const Arr valid = A[A_VALID], fl = A[A_FLOATS], in = A[A_INTS], st = A[A_STEPS];
    const int64_t slen = AT(int64_t, A[A_SLEN], i, W - 1, 0);
    const int64_t seeds = AT(int64_t, A[A_SEEDS], i, 0, 0);
    const int last = W - 1;
    int nvalid = 0;
    double err_window = 0.0, hsum = 0.0, tsum = 0.0;
    for (int w = 0; w < W; w++) {
        nvalid += AT(npy_bool, valid, i, w, 0) != 0;
        err_window += (double)AT(int64_t, in, i, w, P[P_I_ERR]);
        hsum += (double)AT(float, fl, i, w, P[P_F_HEALTH]);
        tsum += (double)AT(int64_t, st, i, w, 0);
    }
    const int has = nvalid > 0;
    const int64_t newest_step = AT(int64_t, st, i, last, 0);
    const int64_t age = step - newest_step > 0 ? step - newest_step : 0;

    for (int j = 0; j < N_LOG_F; j++)
        x[P[P_LOG_F + j]] =
            (float)logscaled(AT(float, fl, i, last, P[P_SRC_LOG_F + j]), S[S_LOG_F + j]);
    x[P[P_ERR]] = (float)logscaled((double)AT(int64_t, in, i, last, P[P_I_ERR]), S[S_ERR]);
    x[P[P_ERR_WINDOW]] = (float)logscaled(err_window, S[S_ERR_WINDOW]);
    x[P[P_ADAPT]] = (float)logscaled((double)AT(int64_t, in, i, last, P[P_I_ADAPT]), S[S_ADAPT]);
    const float log_age = (float)logscaled((double)age, S[S_AGE]);
    x[P[P_HAS]] = (float)has;
    x[P[P_STALE]] = (float)(!has || age > P[P_STALE_AFTER]);
    x[P[P_AGE]] = has ? (log_age < 1.0f ? log_age : 1.0f) : 1.0f;
    x[P[P_FILL]] = (float)((double)nvalid / W);

    /* health over the window: mean, min over valid slots, least-squares trend vs step */
    const double cnt = nvalid > 1 ? nvalid : 1;
    const double hmean = hsum / cnt, tmean = tsum / cnt;
    double var = 0.0, cov = 0.0, hmin = INFINITY;
    for (int w = 0; w < W; w++) {
        const int ok = AT(npy_bool, valid, i, w, 0) != 0;
        const double hw = (double)AT(float, fl, i, w, P[P_F_HEALTH]);
        const double dt = ((double)AT(int64_t, st, i, w, 0) - tmean) * ok;
        var += dt * dt;
        cov += dt * hw;
        if (ok && hw < hmin)
            hmin = hw;
    }
    const double slope = var > 0 ? cov / var : 0.0;
    double trend = slope * S[S_TREND];
    trend = trend < -1.0 ? -1.0 : (trend > 1.0 ? 1.0 : trend);
    const float newest_health = AT(float, fl, i, last, P[P_F_HEALTH]);
    x[P[P_H_LATEST]] = newest_health;
    x[P[P_H_MEAN]] = (float)hmean;
    x[P[P_H_MIN]] = has ? (float)hmin : 0.0f;
    x[P[P_H_TREND]] = (float)trend;
    for (int j = 0; j < N_COPY_F; j++)
        x[P[P_COPY_F + j]] = AT(float, fl, i, last, P[P_SRC_COPY_F + j]);
    const int64_t total = AT(int64_t, in, i, last, P[P_I_TOTAL]);
    const int64_t active = AT(int64_t, in, i, last, P[P_I_ACTIVE]);
    x[P[P_ACTIVE_FRAC]] = total > 0 ? (float)((double)active / (double)total) : 0.0f;

    /* seed states of the newest signal: fraction per state, free (DORMANT) seeds */
    int64_t per_state[N_STATES + 1] = {0};
    int64_t dormant = 0, first_dormant = -1;
    for (int j = 0; j < MAX_SEEDS; j++) {
        const uint8_t code = AT(uint8_t, A[A_STATES], i, last, j);
        if (code >= 1 && code <= N_STATES)
            per_state[code]++;
        if (code == 1 && seeds > j) {
            if (first_dormant < 0)
                first_dormant = j;
            dormant++;
        }
    }
    for (int k = 0; k < N_STATES; k++)
        x[P[P_STATES + k]] = slen > 0 ? (float)((double)per_state[k + 1] / (double)slen) : 0.0f;
    const int has_states = has && slen > 0;
    const int64_t free = has_states ? dormant : (seeds - active > 0 ? seeds - active : 0);
    *free_seed = free > 0 ? (has_states ? first_dormant : active) : -1;
    *target = free > 0 && has_kernels;
    x[P[P_FREE_FRAC]] = seeds > 0 ? (float)((double)free / (double)seeds) : 0.0f;
    x[P[P_HAS_FREE]] = (float)*target;
    *health = has ? newest_health : NAN;
}

/* Graph g's array of one field, checked: numpy, type, rank, aligned, native byte order,
 * leading dim n (and the window / field counts), or 0 with a ValueError naming graph and
 * field. Any strides (statics must be C order: it is copied as one block). */
static int field(PyObject *obj, int a, Py_ssize_t g, npy_intp n, npy_intp d1, npy_intp d2,
                 Arr *out)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_ValueError, "featurize: graph %zd: %s is not a numpy array", g,
                     NAME[a]);
        return 0;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    const npy_intp want[3] = {n, d1, d2};
    int ok = PyArray_EquivTypenums(PyArray_TYPE(arr), TYPE[a]) && PyArray_NDIM(arr) == NDIM[a] &&
             PyArray_ISALIGNED(arr) && PyArray_ISNOTSWAPPED(arr) &&
             (a != A_STATIC || PyArray_IS_C_CONTIGUOUS(arr));
    for (int d = 0; ok && d < NDIM[a]; d++)
        ok = PyArray_DIM(arr, d) == want[d];
    if (!ok) {
        PyErr_Format(PyExc_ValueError,
                     "featurize: graph %zd: %s must be an aligned, native-endian %dD array of "
                     "numpy type number %d with shape (%zd, %zd, %zd)[:%d]",
                     g, NAME[a], NDIM[a], TYPE[a], (Py_ssize_t)n, (Py_ssize_t)d1,
                     (Py_ssize_t)d2, NDIM[a]);
        return 0;
    }
    out->p = PyArray_DATA(arr);
    for (int d = 0; d < 3; d++)
        out->s[d] = d < NDIM[a] ? PyArray_STRIDE(arr, d) : 0;
    return 1;
}

static PyObject *dynamic(PyObject *self, PyObject *args)
{
    (void)self;
    PyArrayObject *plan, *scales, *steps_g, *has_k;
    PyObject *lists[NA];
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!O!O!O!O!O!O!O!", &PyArray_Type, &plan, &PyArray_Type,
                          &scales, &PyList_Type, &lists[A_STATIC], &PyList_Type,
                          &lists[A_VALID], &PyList_Type, &lists[A_FLOATS], &PyList_Type,
                          &lists[A_INTS], &PyList_Type, &lists[A_STEPS], &PyList_Type,
                          &lists[A_SLEN], &PyList_Type, &lists[A_STATES], &PyList_Type,
                          &lists[A_SEEDS], &PyArray_Type, &steps_g, &PyArray_Type, &has_k))
        return NULL;
    const Py_ssize_t B = PyList_GET_SIZE(lists[A_STATIC]);
    if (!PyArray_EquivTypenums(PyArray_TYPE(plan), NPY_INT64) || PyArray_SIZE(plan) != P_COUNT ||
        !PyArray_ISCARRAY_RO(plan) || !PyArray_EquivTypenums(PyArray_TYPE(scales), NPY_FLOAT64) ||
        PyArray_SIZE(scales) != S_COUNT || !PyArray_ISCARRAY_RO(scales)) {
        PyErr_SetString(PyExc_ValueError, "featurize: plan / scales do not match the C module");
        return NULL;
    }
    if (B < 1 || !PyArray_EquivTypenums(PyArray_TYPE(steps_g), NPY_INT64) ||
        PyArray_SIZE(steps_g) != B || PyArray_TYPE(has_k) != NPY_BOOL ||
        PyArray_SIZE(has_k) != B || !PyArray_ISCARRAY_RO(steps_g) || !PyArray_ISCARRAY_RO(has_k)) {
        PyErr_SetString(PyExc_ValueError, "featurize: step / has_kernels must have one entry "
                                          "per graph (int64 / bool)");
        return NULL;
    }
    for (int a = 0; a < NA; a++)
        if (PyList_GET_SIZE(lists[a]) != B) {
            PyErr_Format(PyExc_ValueError, "featurize: %zd graphs but %zd %s arrays", B,
                         PyList_GET_SIZE(lists[a]), NAME[a]);
            return NULL;
        }
    const int64_t *P = PyArray_DATA(plan);
    const double *S = PyArray_DATA(scales);
    const npy_intp NF = P[P_NF], NI = P[P_NI];

    /* Sizes first, every array checked (nothing is read before all are). */
    PyObject *first = PyList_GET_ITEM(lists[A_STATIC], 0);
    if (!PyArray_Check(first) || PyArray_NDIM((PyArrayObject *)first) != 2) {
        PyErr_SetString(PyExc_ValueError, "featurize: graph 0: statics must be a 2D array");
        return NULL;
    }
    const npy_intp F = PyArray_DIM((PyArrayObject *)first, 1);
    PyObject *v0 = PyList_GET_ITEM(lists[A_VALID], 0);
    if (!PyArray_Check(v0) || PyArray_NDIM((PyArrayObject *)v0) != 2 ||
        PyArray_DIM((PyArrayObject *)v0, 1) < 1) {
        PyErr_SetString(PyExc_ValueError, "featurize: graph 0: valid must be [N, W >= 1]");
        return NULL;
    }
    const npy_intp W = PyArray_DIM((PyArrayObject *)v0, 1);
    for (int i = 0; i < P_F_HEALTH; i++)
        if (P[i] < 0 || P[i] >= (i >= P_SRC_LOG_F ? NF : F)) {
            PyErr_Format(PyExc_ValueError, "featurize: plan entry %d out of range", i);
            return NULL;
        }
    if (P[P_F_HEALTH] < 0 || P[P_F_HEALTH] >= NF || P[P_I_ERR] < 0 || P[P_I_ERR] >= NI ||
        P[P_I_ACTIVE] < 0 || P[P_I_ACTIVE] >= NI || P[P_I_TOTAL] < 0 || P[P_I_TOTAL] >= NI ||
        P[P_I_ADAPT] < 0 || P[P_I_ADAPT] >= NI) {
        PyErr_SetString(PyExc_ValueError, "featurize: plan field index out of range");
        return NULL;
    }
    npy_intp N = 0;
    Arr *arrs = PyMem_Malloc((size_t)B * NA * sizeof(Arr));
    if (!arrs)
        return PyErr_NoMemory();
    for (Py_ssize_t g = 0; g < B; g++) {
        PyObject *sx = PyList_GET_ITEM(lists[A_STATIC], g);
        if (!PyArray_Check(sx) || PyArray_NDIM((PyArrayObject *)sx) != 2) {
            PyErr_Format(PyExc_ValueError, "featurize: graph %zd: statics must be a 2D array", g);
            PyMem_Free(arrs);
            return NULL;
        }
        const npy_intp n = PyArray_DIM((PyArrayObject *)sx, 0);
        const npy_intp dims[NA][2] = {{F, 0}, {W, 0},  {W, NF},        {W, NI},
                                      {W, 0}, {W, 0},  {W, MAX_SEEDS}, {0, 0}};
        for (int a = 0; a < NA; a++)
            if (!field(PyList_GET_ITEM(lists[a], g), a, g, n, dims[a][0], dims[a][1],
                       &arrs[g * NA + a])) {
                PyMem_Free(arrs);
                return NULL;
            }
        N += n;
    }

    npy_intp xdims[2] = {N, F};
    PyObject *x = PyArray_SimpleNew(2, xdims, NPY_FLOAT32);
    PyObject *target = PyArray_SimpleNew(1, &N, NPY_BOOL);
    PyObject *health = PyArray_SimpleNew(1, &N, NPY_FLOAT32);
    PyObject *free_seed = PyArray_SimpleNew(1, &N, NPY_INT64);
    if (!x || !target || !health || !free_seed) {
        Py_XDECREF(x);
        Py_XDECREF(target);
        Py_XDECREF(health);
        Py_XDECREF(free_seed);
        PyMem_Free(arrs);
        return NULL;
    }
    float *xo = PyArray_DATA((PyArrayObject *)x), *ho = PyArray_DATA((PyArrayObject *)health);
    uint8_t *to = PyArray_DATA((PyArrayObject *)target);
    int64_t *fo = PyArray_DATA((PyArrayObject *)free_seed);
    const int64_t *stp = PyArray_DATA(steps_g);
    const uint8_t *hk = PyArray_DATA(has_k);
    npy_intp row = 0;
    for (Py_ssize_t g = 0; g < B; g++) {
        const Arr *A = arrs + g * NA;
        const npy_intp n = PyArray_DIM((PyArrayObject *)PyList_GET_ITEM(lists[A_STATIC], g), 0);
        memcpy(xo + row * F, A[A_STATIC].p, sizeof(float) * n * F);
        for (npy_intp i = 0; i < n; i++, row++)
            node(P, S, (int)W, stp[g], hk[g] != 0, i, A, xo + row * F, to + row, ho + row,
                 fo + row);
    }
    PyMem_Free(arrs);
    return Py_BuildValue("(NNNN)", x, target, health, free_seed);
}

static PyMethodDef methods[] = {
    {"dynamic", dynamic, METH_VARARGS,
     "Telemetry features of a batch of graphs (see tamiyo/policy/telemetry_features.py)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_features", "Native per-signal featurizer (telemetry_features.py).", -1,
    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__features(void)
{
    import_array();
    return PyModule_Create(&module);
}
