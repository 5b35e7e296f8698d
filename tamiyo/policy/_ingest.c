/* The usual telemetry frame, checked and written into a session's window, in C.
 *
 * Why: every frame a host sends goes through the event loop, and a full columnar frame
 * (every layer of the session once, in session order: what KasminaLayer hosts send) cost
 * ~30 numpy calls there: decode into SignalColumns, columns_look_valid, then seven field
 * assignments into the window's ring (signal_decode.py, signal_checks.py, snapshot.py).
 * Each numpy call is µs on a loaded loop. Here it is one pass over the serialized
 * HealthSignalColumns bytes: the layout is checked (the layer-id prefix and every column's
 * tag and length, as locate_seed_columns does), every value is checked against the same
 * rules, and only then is ring slot `slot` (and `twin`) of every layer written.
 *
 * This is a rendering of the Python path, not a second definition of the rules: the
 * caller passes every range, bound and offset (SignalWindow.ingest_full and
 * tamiyo_server.signal_checks), and returns to the Python path whenever this says no.
 * "No" means only "not a valid full frame in canonical layout": the Python path then
 * decodes the frame generally and, when it is invalid, names the field. Tests hold the
 * two paths to the same window contents and the same accept / refuse answer.
 *
 * Entry point: full_frame(raw, prefix, heads, plan, hi, bounds, declared, ring, slot, twin
 *                         [, prev, step])
 *   raw      bytes: a serialized HealthSignalColumns
 *   prefix   bytes: the serialized layer_id entries of the session's layers, in order
 *   heads    bytes: every numeric column's tag and length bytes, concatenated
 *   plan     int64 [P_COUNT + 2 * n_heads]: offsets and constants (enum below), then
 *            (offset in raw, length) of each column header in `heads`
 *   hi       float64 [NF]: upper bound of each float column (inf = none; all lower
 *            bounds are 0)
 *   bounds   int64 [M, NI]: upper bound of each count column, per layer
 *   declared int64 [M]: the seed count each layer declared (total_seeds is 0 or this)
 *   ring     the window's record array [M, W] (C-contiguous, writable)
 *   slot     the ring slot to write (0..W-1)
 *   twin     a second slot that gets the same records (0..W-1, not `slot`), or -1:
 *            SignalWindow keeps every signal twice so that a snapshot is a view
 *   prev     the ring slot holding every layer's newest signal (0..W-1), or -1 for none:
 *            a signal whose step is below its layer's newest is refused (steps of a
 *            layer never go back, as in a Decide state's history)
 *   step     the frame's step: a signal measured at a later step is refused
 *            (default: no bound)
 *   returns (max step, max epoch) of the frame when it was written, else None.
 * Keeps the GIL (~2 µs for 32 layers).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define NF 8         /* float columns (snapshot.FLOAT_FIELDS) */
#define NI 4         /* count columns (snapshot.INT_FIELDS) */
#define MAX_SEEDS 64 /* seed-state slots per record (snapshot.MAX_SEEDS) */

enum {
    P_M,          /* layers = signals */
    P_FLOATS,     /* offset of the first float column's values; the others follow */
    P_INTS,       /* offset of the first count column's values */
    P_STRIDE4,    /* bytes between two 4-byte columns' values */
    P_STEP,       /* offset of the step column (int64) */
    P_EPOCH,      /* offset of the epoch column (uint32) */
    P_TS,         /* offset of the timestamp column (float64) */
    P_TAIL,       /* end of the numeric columns: seed columns, if any, follow */
    P_STATES_TAG, /* tag of seed_states (field 17, length-delimited): 2 bytes */
    P_COUNTS_TAG, /* tag of seed_state_counts (field 18, length-delimited): 2 bytes */
    P_STATE_LO,   /* valid SeedLifecycleState values: [lo, hi] */
    P_STATE_HI,
    P_TOTAL,      /* column of total_seeds among the counts */
    P_WINDOW,     /* ring slots per layer */
    P_ITEMSIZE,   /* bytes of one ring record */
    P_R_FLOATS,   /* offsets of the record's fields */
    P_R_INTS,
    P_R_STEPS,
    P_R_EPOCHS,
    P_R_TS,
    P_R_SLEN,
    P_R_STATES,
    P_COUNT
};

static inline float rd_f32(const unsigned char *p) { float v; memcpy(&v, p, 4); return v; }
static inline uint32_t rd_u32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline int64_t rd_i64(const unsigned char *p) { int64_t v; memcpy(&v, p, 8); return v; }
static inline double rd_f64(const unsigned char *p) { double v; memcpy(&v, p, 8); return v; }

/* A varint at raw[*j] (j < n); 0 when it runs past n or over 10 bytes. */
static int read_varint(const unsigned char *raw, Py_ssize_t n, Py_ssize_t *j, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 70 && *j < n; shift += 7) {
        unsigned char b = raw[(*j)++];
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

/* Bytes of the canonical varint of v. */
static int varint_len(uint64_t v) {
    int k = 1;
    while (v >= 0x80) {
        v >>= 7;
        k++;
    }
    return k;
}

static const void *array_data(PyObject *o, int typenum, int ndim, const npy_intp *shape,
                              const char *name, int writable) {
    if (!PyArray_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: a numpy array is required", name);
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)o;
    if (typenum >= 0 && PyArray_TYPE(a) != typenum) {
        PyErr_Format(PyExc_TypeError, "%s: wrong dtype", name);
        return NULL;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a) || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_ValueError, "%s: must be C-contiguous, aligned, native order", name);
        return NULL;
    }
    if (writable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: must be writable", name);
        return NULL;
    }
    if (PyArray_NDIM(a) != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: %d dimensions expected", name, ndim);
        return NULL;
    }
    for (int d = 0; d < ndim; d++) {
        if (shape[d] >= 0 && PyArray_DIM(a, d) != shape[d]) {
            PyErr_Format(PyExc_ValueError, "%s: wrong shape", name);
            return NULL;
        }
    }
    return PyArray_DATA(a);
}

/* Every plan entry is an offset, a size or a small constant: bounding them all first keeps
 * the sums and products below far from int64 overflow (a caller's bad plan then raises
 * instead of wrapping around into a wild read or write). */
#define PLAN_MAX ((int64_t)1 << 40)

static PyObject *full_frame(PyObject *self, PyObject *args) {
    PyObject *raw_o, *prefix_o, *heads_o; /* bytes only: immutable, never the ring's memory */
    PyObject *plan_o, *hi_o, *bounds_o, *declared_o, *ring_o;
    Py_ssize_t slot, twin, prev = -1;
    long long frame_step = INT64_MAX;
    if (!PyArg_ParseTuple(args, "SSSOOOOOnn|nL", &raw_o, &prefix_o, &heads_o, &plan_o, &hi_o,
                          &bounds_o, &declared_o, &ring_o, &slot, &twin, &prev, &frame_step))
        return NULL;
    const unsigned char *raw = (const unsigned char *)PyBytes_AS_STRING(raw_o);
    const unsigned char *prefix = (const unsigned char *)PyBytes_AS_STRING(prefix_o);
    const unsigned char *heads = (const unsigned char *)PyBytes_AS_STRING(heads_o);
    const Py_ssize_t n = PyBytes_GET_SIZE(raw_o), n_prefix = PyBytes_GET_SIZE(prefix_o);
    const Py_ssize_t n_heads_b = PyBytes_GET_SIZE(heads_o);

    /* -- arguments (a caller's bug, not a frame's: raise) */
    if (!PyArray_Check(plan_o) || PyArray_NDIM((PyArrayObject *)plan_o) != 1) {
        PyErr_SetString(PyExc_TypeError, "plan: a 1-d int64 array is required");
        return NULL;
    }
    npy_intp plan_len = PyArray_DIM((PyArrayObject *)plan_o, 0);
    npy_intp plan_shape[1] = {plan_len};
    const int64_t *plan = array_data(plan_o, NPY_INT64, 1, plan_shape, "plan", 0);
    if (!plan)
        return NULL;
    if (plan_len < P_COUNT || (plan_len - P_COUNT) % 2) {
        PyErr_SetString(PyExc_ValueError, "plan: wrong length");
        return NULL;
    }
    for (npy_intp k = 0; k < plan_len; k++) {
        if (plan[k] < 0 || plan[k] > PLAN_MAX) {
            PyErr_Format(PyExc_ValueError, "plan[%zd]: %lld out of range", (Py_ssize_t)k,
                         (long long)plan[k]);
            return NULL;
        }
    }
    const int64_t m = plan[P_M], w = plan[P_WINDOW], isz = plan[P_ITEMSIZE];
    const npy_intp n_heads = (plan_len - P_COUNT) / 2;
    npy_intp hi_shape[1] = {NF}, b_shape[2] = {m, NI}, d_shape[1] = {m};
    const double *hi = array_data(hi_o, NPY_FLOAT64, 1, hi_shape, "hi", 0);
    const int64_t *bounds = hi ? array_data(bounds_o, NPY_INT64, 2, b_shape, "bounds", 0) : NULL;
    const int64_t *declared =
        bounds ? array_data(declared_o, NPY_INT64, 1, d_shape, "declared", 0) : NULL;
    npy_intp r_shape[2] = {m, w};
    unsigned char *ring =
        declared ? (unsigned char *)array_data(ring_o, NPY_VOID, 2, r_shape, "ring", 1) : NULL;
    if (!ring)
        return NULL;
    if (PyDataType_REFCHK(PyArray_DESCR((PyArrayObject *)ring_o))) {
        PyErr_SetString(PyExc_TypeError, "ring: records holding Python objects");
        return NULL;
    }
    if (m < 1 || w < 1 || slot < 0 || slot >= w || twin < -1 || twin >= w || twin == slot ||
        prev < -1 || prev >= w ||
        PyArray_ITEMSIZE((PyArrayObject *)ring_o) != isz || isz < 1 ||
        plan[P_R_FLOATS] + 4 * NF > isz || plan[P_R_INTS] + 8 * NI > isz ||
        plan[P_R_STEPS] + 8 > isz || plan[P_R_EPOCHS] + 8 > isz || plan[P_R_TS] + 8 > isz ||
        plan[P_R_SLEN] + 8 > isz || plan[P_R_STATES] + MAX_SEEDS > isz ||
        plan[P_TOTAL] >= NI || plan[P_STATES_TAG] > 0xFFFF || plan[P_COUNTS_TAG] > 0xFFFF) {
        PyErr_SetString(PyExc_ValueError, "plan: inconsistent with the ring or out of range");
        return NULL;
    }
    /* every value the loops below read lies before the tail */
    const int64_t tail = plan[P_TAIL], s4 = plan[P_STRIDE4];
    if (plan[P_FLOATS] + (NF - 1) * s4 + 4 * m > tail ||
        plan[P_INTS] + (NI - 1) * s4 + 4 * m > tail || plan[P_STEP] + 8 * m > tail ||
        plan[P_EPOCH] + 4 * m > tail || plan[P_TS] + 8 * m > tail || n_prefix > tail) {
        PyErr_SetString(PyExc_ValueError, "plan: a column lies past the tail");
        return NULL;
    }
    int64_t head_bytes = 0;
    for (npy_intp k = 0; k < n_heads; k++) {
        int64_t off = plan[P_COUNT + 2 * k], len = plan[P_COUNT + 2 * k + 1];
        if (off + len > tail) {
            PyErr_SetString(PyExc_ValueError, "plan: a column header out of range");
            return NULL;
        }
        head_bytes += len;
    }
    if (head_bytes != n_heads_b) {
        PyErr_SetString(PyExc_ValueError, "plan: header lengths do not add up to heads");
        return NULL;
    }

    /* -- layout: the layer ids, every column's tag and length (else not this path) */
    if (n < tail || memcmp(raw, prefix, (size_t)n_prefix) != 0)
        Py_RETURN_NONE;
    for (npy_intp k = 0, h = 0; k < n_heads; k++) {
        int64_t off = plan[P_COUNT + 2 * k], len = plan[P_COUNT + 2 * k + 1];
        if (memcmp(raw + off, heads + h, (size_t)len) != 0)
            Py_RETURN_NONE;
        h += len;
    }
    /* seed columns: none, or seed_states then seed_state_counts (4 m bytes), to the end */
    const unsigned char *states = NULL, *counts = NULL;
    uint64_t n_states = 0;
    if (n > tail) {
        Py_ssize_t j = tail;
        uint64_t ln;
        if (n - j < 2 || raw[j] != (plan[P_STATES_TAG] & 0xFF) ||
            raw[j + 1] != (plan[P_STATES_TAG] >> 8))
            goto no;
        j += 2;
        Py_ssize_t at = j; /* canonical lengths only: what protobuf writes (and parses) */
        if (!read_varint(raw, n, &j, &ln) || j - at != varint_len(ln) || ln > (uint64_t)(n - j))
            goto no;
        states = raw + j;
        n_states = ln;
        j += (Py_ssize_t)ln;
        const uint64_t want = 4 * (uint64_t)m;
        if (n - j < 2 || raw[j] != (plan[P_COUNTS_TAG] & 0xFF) ||
            raw[j + 1] != (plan[P_COUNTS_TAG] >> 8))
            goto no;
        j += 2;
        at = j;
        if (!read_varint(raw, n, &j, &ln) || ln != want || j - at != varint_len(want) ||
            (uint64_t)(n - j) != want)
            goto no;
        counts = raw + j;
    }

    /* -- values: the rules of columns_look_valid (and the decoder's own refusals).
     * (plan entries in locals: the ring writes below go through a char pointer, which
     * may alias anything, so the compiler would reload each from memory per layer) */
    const int64_t lo_state = plan[P_STATE_LO], hi_state = plan[P_STATE_HI];
    const int64_t total_col = plan[P_TOTAL];
    const unsigned char *f_col = raw + plan[P_FLOATS], *i_col = raw + plan[P_INTS];
    const unsigned char *st_col = raw + plan[P_STEP], *ep_col = raw + plan[P_EPOCH];
    const unsigned char *ts_col = raw + plan[P_TS];
    uint64_t sum_counts = 0;
    int64_t max_step = INT64_MIN, max_epoch = 0;
    const int64_t r_steps = plan[P_R_STEPS];
    for (int64_t i = 0; i < m; i++) {
        int bad = 0;
        for (int k = 0; k < NF; k++) {
            float f = rd_f32(f_col + k * s4 + 4 * i);
            bad |= !isfinite(f) | (f < 0.0f) | ((double)f > hi[k]);
        }
        double ts = rd_f64(ts_col + 8 * i);
        int64_t st = rd_i64(st_col + 8 * i);
        bad |= !isfinite(ts) | (ts < 0.0) | (st < 0) | (st > frame_step);
        if (prev >= 0)
            bad |= st < rd_i64(ring + (i * w + prev) * isz + r_steps);
        int64_t total = 0;
        for (int k = 0; k < NI; k++) {
            int64_t v = rd_u32(i_col + k * s4 + 4 * i);
            bad |= v > bounds[i * NI + k];
            total = k == total_col ? v : total;
        }
        bad |= (total != 0) & (total != declared[i]);
        if (counts) {
            uint32_t c = rd_u32(counts + 4 * i);
            bad |= (c > MAX_SEEDS) | ((c != 0) & (c != total));
            sum_counts += c;
        }
        if (bad)
            goto no;
        int64_t ep = rd_u32(ep_col + 4 * i);
        max_step = st > max_step ? st : max_step;
        max_epoch = ep > max_epoch ? ep : max_epoch;
    }
    if (counts) {
        if (sum_counts != n_states)
            goto no;
        for (uint64_t k = 0; k < n_states; k++) /* one byte per value: every valid state */
            if (states[k] >= 0x80 || states[k] < lo_state || states[k] > hi_state)
                goto no;
    }

    /* -- write ring slot `slot` of every layer (nothing was written before this point) */
    const int64_t r_floats = plan[P_R_FLOATS], r_ints = plan[P_R_INTS];
    const int64_t r_epochs = plan[P_R_EPOCHS];
    const int64_t r_ts = plan[P_R_TS], r_slen = plan[P_R_SLEN], r_states = plan[P_R_STATES];
    const unsigned char *next_state = states;
    for (int64_t i = 0; i < m; i++) {
        unsigned char *rec = ring + (i * w + slot) * isz;
        for (int k = 0; k < NF; k++)
            memcpy(rec + r_floats + 4 * k, f_col + k * s4 + 4 * i, 4);
        for (int k = 0; k < NI; k++) {
            int64_t v = rd_u32(i_col + k * s4 + 4 * i);
            memcpy(rec + r_ints + 8 * k, &v, 8);
        }
        memcpy(rec + r_steps, st_col + 8 * i, 8);
        int64_t ep = rd_u32(ep_col + 4 * i);
        memcpy(rec + r_epochs, &ep, 8);
        memcpy(rec + r_ts, ts_col + 8 * i, 8);
        int64_t c = counts ? rd_u32(counts + 4 * i) : 0;
        memcpy(rec + r_slen, &c, 8);
        memset(rec + r_states, 0, MAX_SEEDS);
        if (c) {
            memcpy(rec + r_states, next_state, (size_t)c);
            next_state += c;
        }
        if (twin >= 0)
            memcpy(ring + (i * w + twin) * isz, rec, (size_t)isz);
    }
    return Py_BuildValue("(LL)", (long long)max_step, (long long)max_epoch);
no:
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"full_frame", full_frame, METH_VARARGS,
     "Check a full columnar frame and write it into ring slot `slot` and `twin` (see the module "
     "source); (max step, max epoch) when written, None when the Python path must decide."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_ingest", NULL, -1, methods};

PyMODINIT_FUNC PyInit__ingest(void) {
    import_array();
    return PyModule_Create(&module);
}
