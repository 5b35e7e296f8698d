/* The serving forward of the GCN policy, fused per graph (CPU).
 *
 * Why native: the torch rendering is ~80 library ops per forward, each a pass over the
 * batch's activations in memory (a [4096, 64] float32 tensor is 1 MiB, larger than L1 and
 * half of L2) plus ~5-10 us of dispatch; at the model's shapes (K = 40-64) that is 2.5-6x
 * the time of the matrix products alone. Graphs are independent, so this file runs the
 * whole network for ONE graph at a time while its activations stay in L1/L2: every layer
 * is one register-blocked product with its bias, ReLU, aggregation and residual applied
 * in the same pass. See tamiyo/policy/fused.py for the Python side (weight packing, the
 * check against the compiled forward, output views) and model.py / engine.ServingForward
 * for the arithmetic this mirrors op for op.
 *
 * Portable C with GCC/Clang vector extensions: a v16 is 16 floats; the compiler lowers it
 * to AVX-512, AVX2 or SSE depending on the -march the extension was built with (setup.py).
 * No -ffast-math: NaN and inf propagate as in torch (a NaN logit must not become a
 * decision).
 *
 * Entry point: forward(params, layout, dims, scale, tie_tol,
 *                      xs, crows, cols, vals, kernel_xs, targets) -> (pair, tp, per, shape)
 *   params   float32 [*]  packed weights (fused.py: each Linear as W^T [in, out_pad] then
 *                         bias [out_pad], out_pad a multiple of 16, padding zero)
 *   layout   int64 [L + 7, 5]  per Linear: in, out, out_pad, w_offset, b_offset (floats)
 *   dims     (F, H, L, Hk, HH, Fk)  node features, hidden, GCN layers, kernel hidden,
 *                         graph-head hidden, kernel features
 *   six lists with one array per graph g (the GraphTensors' own arrays, no copy):
 *     x float32 [n_g, F]; crow int64 [n_g + 1] and col int64 [nnz_g] (A-hat in CSR, local
 *     indices); val float32 [nnz_g]; kernel_x float32 [k_g, Fk]; target bool [n_g]
 *   returns four bytearrays (fused.py views them as numpy arrays):
 *     pair  float32 [sum n_g k_g]  log P(adapt(i, j)), graph g's [n_g, k_g] block after
 *                         those of graphs < g (-inf for invalid pairs)
 *     tp    float32 [sum n_g]  P(layer | adapt)
 *     per   float64 [B, 6]  no-op log-prob, adapt probability, best node (-1 none), best
 *                         kernel (-1 none), urgency, value
 *     shape int64 [B, 3]  n_g, nnz_g, k_g
 * Every array's type, size and every CSR index is checked before any is read (ValueError
 * naming the graph and field).
 * The GIL is released while the graphs are computed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VW 16 /* floats per vector */
typedef float v16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t vi16 __attribute__((vector_size(64), aligned(4), may_alias));

/* Register tile of the products: TR rows x TC vectors of outputs. AVX-512 has 32 vector
 * registers (16 accumulators + 4 weight vectors + 1 broadcast fit); with AVX2 a v16 is
 * two of 16 registers, so the tile is smaller. */
#if defined(__AVX512F__)
#define TR 4
#define TC 4
#else
#define TR 2
#define TC 2
#endif

static inline v16 vload(const float *p) { return *(const v16 *)p; }
static inline void vstore(float *p, v16 v) { *(v16 *)p = v; }
static inline v16 vsplat(float a)
{
    return (v16){a, a, a, a, a, a, a, a, a, a, a, a, a, a, a, a};
}

/* max(v, 0) that keeps NaN (as torch.relu): zero the lanes that are <= 0. */
static inline v16 vrelu(v16 v) { return (v16)((vi16)v & ~(vi16)(v <= 0.0f)); }

/* O[r, c] = bias + sum_k A[r, k] W[k, c] (then ReLU) for R rows and C vectors of columns.
 * Called with constant R and C only, so after inlining the accumulators live in
 * registers. */
static inline __attribute__((always_inline)) void tile(
    const int R, const int C, const float *restrict A, long lda, int K,
    const float *restrict W, long ldw, const float *restrict bias, float *restrict O,
    long ldo, int relu)
{
    v16 acc[TR][TC];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            acc[r][c] = bias ? vload(bias + VW * c) : (v16){0};
    for (int k = 0; k < K; k++) {
        v16 w[TC];
        for (int c = 0; c < C; c++)
            w[c] = vload(W + (long)k * ldw + VW * c);
        for (int r = 0; r < R; r++) {
            v16 a = vsplat(A[(long)r * lda + k]);
            for (int c = 0; c < C; c++)
                acc[r][c] += a * w[c];
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            vstore(O + (long)r * ldo + VW * c, relu ? vrelu(acc[r][c]) : acc[r][c]);
}

#define TILE_CASES(R)                                                                   \
    switch (C) {                                                                        \
    case 1: tile(R, 1, a, lda, K, w, ldw, b, o, ldo, relu); break;                       \
    case 2: tile(R, 2, a, lda, K, w, ldw, b, o, ldo, relu); break;                       \
    TILE_WIDE(R)                                                                        \
    }
#if TC >= 4
#define TILE_WIDE(R)                                                                    \
    case 3: tile(R, 3, a, lda, K, w, ldw, b, o, ldo, relu); break;                       \
    case 4: tile(R, 4, a, lda, K, w, ldw, b, o, ldo, relu); break;
#else
#define TILE_WIDE(R)
#endif

/* O [n, Mp] = A [n, K] (row stride lda) @ W [K, Mp] + bias (optional), ReLU optional.
 * Mp is a multiple of VW. */
static void gemm(int n, int K, int Mp, const float *A, long lda, const float *W,
                 const float *bias, float *O, long ldo, int relu)
{
    const long ldw = Mp;
    for (int j = 0; j < Mp; j += VW * TC) {
        int C = (Mp - j) / VW;
        if (C > TC)
            C = TC;
        const float *w = W + j, *b = bias ? bias + j : NULL;
        int i = 0;
        for (; i + TR <= n; i += TR) {
            const float *a = A + (long)i * lda;
            float *o = O + (long)i * ldo + j;
            TILE_CASES(TR)
        }
        if (i < n) { /* the last 1 to TR-1 rows */
            const float *a = A + (long)i * lda;
            float *o = O + (long)i * ldo + j;
            switch (n - i) {
            case 1: TILE_CASES(1) break;
#if TR >= 4
            case 2: TILE_CASES(2) break;
            case 3: TILE_CASES(3) break;
#endif
            }
        }
    }
}

typedef struct {
    int64_t in, out, pad, w, b;
} Linear;

typedef struct {
    const float *params;
    const Linear *lin; /* enc0, enc1, conv[0..L-1], node_head, kenc0, kenc1, gh0, gh1 */
    int F, H, L, Hk, HH, Fk;
    float scale, tie_tol;
} Net;

#define LIN_ENC0 0
#define LIN_ENC1 1
#define LIN_CONV 2
#define LIN_NODE(net) (LIN_CONV + (net)->L)
#define LIN_KENC0(net) (LIN_NODE(net) + 1)
#define LIN_KENC1(net) (LIN_NODE(net) + 2)
#define LIN_GH0(net) (LIN_NODE(net) + 3)
#define LIN_GH1(net) (LIN_NODE(net) + 4)

static inline const float *W_(const Net *net, int i) { return net->params + net->lin[i].w; }
static inline const float *B_(const Net *net, int i) { return net->params + net->lin[i].b; }

#define NSLOT 14
/* Scratch for one graph, sized for the largest of the batch. */
typedef struct {
    float *a, *h, *t, *nh, *ka, *ke, *ket, *dots, *pair, *rowmax, *e, *pool, *g1, *g2;
} Scratch;

static inline float maxnan(float m, float v) { return (v > m || isnan(v)) ? v : m; }

/* Lane-wise maxnan. */
static inline v16 vmaxnan(v16 m, v16 v)
{
    const vi16 take = (v > m) | (v != v);
    return (v16)(((vi16)v & take) | ((vi16)m & ~take));
}

/* torch.logaddexp for float32. */
static float logaddexpf_(float a, float b)
{
    if (isnan(a) || isnan(b))
        return NAN;
    if (isinf(a) && a == b)
        return a;
    float m = a > b ? a : b;
    return m + log1pf(expf(-fabsf(a - b)));
}

static float sigmoidf_(float u)
{
    if (u >= 0.0f)
        return 1.0f / (1.0f + expf(-u));
    float e = expf(u);
    return e / (1.0f + e);
}

/* The network and its per-graph post-processing (engine.ServingForward) for one graph. */
static void graph_forward(const Net *net, const Scratch *s, int n, int k, const float *x,
                          const int64_t *crow_tail, const int64_t *col, const float *val,
                          const float *kx, const uint8_t *target, float *out_pair,
                          float *out_tp, double *out_per)
{
    const int H = net->H, Hk = net->Hk;
    const long Hp = net->lin[LIN_ENC1].pad, NHp = net->lin[LIN_NODE(net)].pad;
    const long Hkp = net->lin[LIN_KENC1(net)].pad;

    /* h = enc1(relu(enc0(x))) [n, Hp] */
    gemm(n, net->F, (int)net->lin[LIN_ENC0].pad, x, net->F, W_(net, LIN_ENC0),
         B_(net, LIN_ENC0), s->a, net->lin[LIN_ENC0].pad, 1);
    gemm(n, (int)net->lin[LIN_ENC1].in, (int)Hp, s->a, net->lin[LIN_ENC0].pad,
         W_(net, LIN_ENC1), B_(net, LIN_ENC1), s->h, Hp, 0);

    /* h = h + relu(A-hat (h W^T) + b), per GCN layer */
    for (int l = 0; l < net->L; l++) {
        const int li = LIN_CONV + l;
        gemm(n, H, (int)Hp, s->h, Hp, W_(net, li), NULL, s->t, Hp, 0);
        const float *bias = B_(net, li);
        int64_t start = 0;
        for (int i = 0; i < n; i++) {
            const int64_t end = crow_tail[i];
            for (long c = 0; c < Hp; c += VW) {
                v16 acc = vload(bias + c);
                for (int64_t e = start; e < end; e++)
                    acc += vsplat(val[e]) * vload(s->t + col[e] * Hp + c);
                vstore(s->h + i * Hp + c, vload(s->h + i * Hp + c) + vrelu(acc));
            }
            start = end;
        }
    }

    /* node head: [score | query] [n, NHp] */
    gemm(n, H, (int)NHp, s->h, Hp, W_(net, LIN_NODE(net)), B_(net, LIN_NODE(net)), s->nh, NHp,
         0);

    /* pair logits [n, k]: score_i + scale <query_i, kemb_j>, -inf where invalid; the dot
     * products are one product query [n, Hk] @ kemb^T [Hk, kp] (kp = k padded to VW) */
    const long kp = (k + VW - 1) / VW * VW;
    if (k > 0) {
        gemm(k, net->Fk, (int)net->lin[LIN_KENC0(net)].pad, kx, net->Fk,
             W_(net, LIN_KENC0(net)), B_(net, LIN_KENC0(net)), s->ka,
             net->lin[LIN_KENC0(net)].pad, 1);
        gemm(k, (int)net->lin[LIN_KENC1(net)].in, (int)Hkp, s->ka, net->lin[LIN_KENC0(net)].pad,
             W_(net, LIN_KENC1(net)), B_(net, LIN_KENC1(net)), s->ke, Hkp, 0);
        for (int d = 0; d < Hk; d++) {
            for (int j = 0; j < k; j++)
                s->ket[d * kp + j] = s->ke[(long)j * Hkp + d];
            for (long j = k; j < kp; j++)
                s->ket[d * kp + j] = 0.0f;
        }
        gemm(n, Hk, (int)kp, s->nh + 1, NHp, s->ket, NULL, s->dots, kp, 0);
    }
    for (int i = 0; i < n; i++) {
        const float score = s->nh[i * NHp];
        float m = -INFINITY;
        for (int j = 0; j < k; j++) {
            const float v = target[i] ? score + net->scale * s->dots[i * kp + j] : -INFINITY;
            s->pair[(long)i * k + j] = v;
            m = maxnan(m, v);
        }
        s->rowmax[i] = m;
    }

    /* graph head on [mean-pool | max-pool] -> no-op logit, urgency logit, value */
    /* (rows in order, as torch's index_add; lanes are independent columns) */
    for (long c = 0; c < Hp; c += VW) {
        v16 sum = (v16){0}, mx = vsplat(-INFINITY);
        for (int i = 0; i < n; i++) {
            const v16 v = vload(s->h + i * Hp + c);
            sum += v;
            mx = vmaxnan(mx, v);
        }
        vstore(s->pool + c, sum / vsplat((float)n));
        vstore(s->pool + Hp + c, mx);
    }
    if (Hp != H) /* gh0 reads [mean | max] as one row of 2H */
        memmove(s->pool + H, s->pool + Hp, sizeof(float) * H);
    gemm(1, 2 * H, (int)net->lin[LIN_GH0(net)].pad, s->pool, 2 * H, W_(net, LIN_GH0(net)),
         B_(net, LIN_GH0(net)), s->g1, 0, 1);
    gemm(1, net->HH, (int)net->lin[LIN_GH1(net)].pad, s->g1, 0, W_(net, LIN_GH1(net)),
         B_(net, LIN_GH1(net)), s->g2, 0, 0);
    const float noop = s->g2[0];

    /* per-graph softmax over (node x kernel) + {no-op}, as engine.ServingForward */
    float pmax = -1e30f; /* no valid pair: not -inf, so no NaN below */
    for (int i = 0; i < n; i++)
        pmax = maxnan(pmax, s->rowmax[i]);
    float z = 0.0f;
    for (int i = 0; i < n; i++) {
        float e = 0.0f;
        for (int j = 0; j < k; j++)
            e += expf(s->pair[(long)i * k + j] - pmax);
        s->e[i] = e;
        z += e;
    }
    const float zc = z < 1.0f ? 1.0f : z; /* clamp(min=1) keeping NaN */
    for (int i = 0; i < n; i++)
        out_tp[i] = s->e[i] / zc;
    const float lse = logaddexpf_(pmax + logf(z), noop);
    for (long p = 0; p < (long)n * k; p++)
        out_pair[p] = s->pair[p] - lse;
    const float noop_logp = noop - lse;

    /* best pair: first node within tie_tol of the max, then its first kernel */
    float apm = fabsf(pmax);
    const float tol = net->tie_tol * (apm < 1.0f ? 1.0f : apm);
    int best = -1, best_k = -1;
    for (int i = 0; i < n; i++) {
        if (s->rowmax[i] >= pmax - tol) {
            best = i;
            break;
        }
    }
    if (best >= 0) {
        const float *row = s->pair + (long)best * k;
        const float thr = s->rowmax[best] - tol;
        for (int j = 0; j < k; j++) {
            if (row[j] >= thr) {
                best_k = j;
                break;
            }
        }
    }
    out_per[0] = noop_logp;
    out_per[1] = -expm1f(noop_logp);
    out_per[2] = best;
    out_per[3] = best_k;
    out_per[4] = sigmoidf_(s->g2[1]);
    out_per[5] = s->g2[2];
}

static void *scratch_alloc(size_t floats)
{
    size_t bytes = ((floats * sizeof(float) + 63) / 64) * 64 + 64;
    return aligned_alloc(64, bytes); /* every slot is written before it is read */
}

/* Per graph: x, crow, col, val, kernel_x, target (the lists' items). */
enum { GX, GCROW, GCOL, GVAL, GKX, GTGT, NG };
static const char *const FIELD[NG] = {"x", "crow", "col", "val", "kernel_x", "target_mask"};
static const char KIND[NG] = {'f', 'i', 'i', 'f', 'f', 'b'};

/* Contiguous buffer of the expected element type (f: float32, i: int64, b: bool/uint8). */
static int get_buffer(PyObject *obj, Py_buffer *view, int field, Py_ssize_t g)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: %s is not a contiguous array",
                     g, FIELD[field]);
        return 0;
    }
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    int ok;
    switch (KIND[field]) {
    case 'f': ok = view->itemsize == 4 && *f == 'f'; break;
    case 'i': ok = view->itemsize == 8 && (*f == 'l' || *f == 'q'); break;
    default: ok = view->itemsize == 1 && (*f == '?' || *f == 'B' || *f == 'b'); break;
    }
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: %s has element type '%s'", g,
                     FIELD[field], view->format ? view->format : "B");
        PyBuffer_Release(view);
        view->obj = NULL;
        return 0;
    }
    return 1;
}

/* Sizes of graph g from its buffers (n nodes, nnz entries, k kernels), or 0 with an error
 * naming what is inconsistent. Indices are read from memory later, so they are checked. */
static int graph_shape(const Py_buffer *v, Py_ssize_t g, int F, int Fk, int64_t *n, int64_t *nnz,
                       int64_t *k)
{
    const int64_t *crow = v[GCROW].buf, *col = v[GCOL].buf;
    const Py_ssize_t rows = v[GCROW].len / 8 - 1;
    if (rows < 1 || crow[0] != 0) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: crow must be [0, ...] of N+1 >= 2",
                     g);
        return 0;
    }
    for (Py_ssize_t i = 0; i < rows; i++)
        if (crow[i + 1] < crow[i]) {
            PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: crow decreases at row %zd",
                         g, i);
            return 0;
        }
    *n = rows;
    *nnz = crow[rows];
    if (v[GCOL].len != *nnz * 8 || v[GVAL].len != *nnz * 4) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: col/val do not have %lld entries",
                     g, (long long)*nnz);
        return 0;
    }
    for (int64_t e = 0; e < *nnz; e++)
        if (col[e] < 0 || col[e] >= rows) {
            PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: column %lld out of range",
                         g, (long long)col[e]);
            return 0;
        }
    if (v[GX].ndim != 2 || v[GX].len != rows * F * 4 || v[GTGT].len != rows) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: x / target_mask are not [%zd, %d] "
                     "/ [%zd]", g, rows, F, rows);
        return 0;
    }
    if (v[GKX].ndim != 2 || v[GKX].shape[1] != Fk) {
        PyErr_Format(PyExc_ValueError, "fused forward: graph %zd: kernel_x is not [K, %d]", g, Fk);
        return 0;
    }
    *k = v[GKX].len / (Fk * 4);
    return 1;
}

static PyObject *forward(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer pb = {0}, lb = {0};
    PyObject *lists[NG];
    int F, H, L, Hk, HH, Fk;
    double scale, tie_tol;
    if (!PyArg_ParseTuple(args, "y*y*(iiiiii)ddO!O!O!O!O!O!", &pb, &lb, &F, &H, &L, &Hk, &HH, &Fk,
                          &scale, &tie_tol, &PyList_Type, &lists[GX], &PyList_Type, &lists[GCROW],
                          &PyList_Type, &lists[GCOL], &PyList_Type, &lists[GVAL], &PyList_Type,
                          &lists[GKX], &PyList_Type, &lists[GTGT]))
        return NULL;
    PyObject *ret = NULL, *out[4] = {NULL, NULL, NULL, NULL};
    float *mem = NULL;
    Py_buffer *views = NULL;
    int64_t *shape = NULL; /* [B, 3]: n, nnz, k */
    const Py_ssize_t B = PyList_GET_SIZE(lists[GX]);
    const int nlin = L + 7;
    if (F < 1 || H < 1 || L < 0 || Hk < 1 || HH < 1 || Fk < 1) {
        PyErr_SetString(PyExc_ValueError, "fused forward: dims must be positive");
        goto done;
    }
    if (lb.len != (Py_ssize_t)nlin * 5 * 8) {
        PyErr_SetString(PyExc_ValueError, "fused forward: layout is not int64 [L + 7, 5]");
        goto done;
    }
    const Linear *lin = (const Linear *)lb.buf;
    const Py_ssize_t nparams = pb.len / 4;
    for (int i = 0; i < nlin; i++) {
        const Linear *l = &lin[i];
        if (l->in < 1 || l->out < 1 || l->pad < l->out || l->pad % VW || l->w < 0 || l->b < 0 ||
            l->w + l->in * l->pad > nparams || l->b + l->pad > nparams) {
            PyErr_Format(PyExc_ValueError, "fused forward: layout row %d is out of range", i);
            goto done;
        }
    }
    const Net net = {(const float *)pb.buf, lin, F, H, L, Hk, HH, Fk, (float)scale,
                     (float)tie_tol};
    const long Hp = lin[LIN_ENC1].pad;
    if (lin[LIN_ENC0].in != F || lin[LIN_ENC1].out != H || lin[LIN_NODE(&net)].out != 1 + Hk ||
        lin[LIN_KENC0(&net)].in != Fk || lin[LIN_KENC1(&net)].out != Hk ||
        lin[LIN_GH0(&net)].in != 2 * H || lin[LIN_GH0(&net)].out != HH ||
        lin[LIN_GH1(&net)].out != 3 || lin[LIN_GH1(&net)].pad != VW) {
        PyErr_SetString(PyExc_ValueError, "fused forward: layout does not match dims");
        goto done;
    }
    for (int l = 0; l < L; l++)
        if (lin[LIN_CONV + l].in != H || lin[LIN_CONV + l].pad != Hp) {
            PyErr_SetString(PyExc_ValueError, "fused forward: a GCN layer is not [H, H]");
            goto done;
        }
    if (B < 1) {
        PyErr_SetString(PyExc_ValueError, "fused forward: empty batch");
        goto done;
    }
    for (int f = 0; f < NG; f++)
        if (PyList_GET_SIZE(lists[f]) != B) {
            PyErr_Format(PyExc_ValueError, "fused forward: %zd graphs but %zd %s arrays", B,
                         PyList_GET_SIZE(lists[f]), FIELD[f]);
            goto done;
        }

    views = PyMem_Calloc((size_t)B * NG, sizeof(Py_buffer));
    shape = PyMem_Malloc((size_t)B * 3 * sizeof(int64_t));
    if (!views || !shape) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t N = 0, PT = 0;
    int64_t max_n = 0, max_k = 0;
    for (Py_ssize_t g = 0; g < B; g++) {
        Py_buffer *v = views + g * NG;
        for (int f = 0; f < NG; f++)
            if (!get_buffer(PyList_GET_ITEM(lists[f], g), &v[f], f, g))
                goto done;
        int64_t *sh = shape + 3 * g;
        if (!graph_shape(v, g, F, Fk, &sh[0], &sh[1], &sh[2]))
            goto done;
        N += sh[0];
        PT += sh[0] * sh[2];
        max_n = sh[0] > max_n ? sh[0] : max_n;
        max_k = sh[2] > max_k ? sh[2] : max_k;
    }

    /* Outputs (bytearrays; fused.py views them as numpy arrays without a copy). */
    out[0] = PyByteArray_FromStringAndSize(NULL, PT * 4);
    out[1] = PyByteArray_FromStringAndSize(NULL, N * 4);
    out[2] = PyByteArray_FromStringAndSize(NULL, B * 6 * 8);
    out[3] = PyByteArray_FromStringAndSize((const char *)shape, B * 3 * 8);
    if (!out[0] || !out[1] || !out[2] || !out[3])
        goto done;

    /* Scratch, sized for the largest graph. */
    const long wide = Hp > lin[LIN_ENC0].pad ? Hp : lin[LIN_ENC0].pad;
    const long NHp = lin[LIN_NODE(&net)].pad;
    const long kw = lin[LIN_KENC0(&net)].pad > lin[LIN_KENC1(&net)].pad
                        ? lin[LIN_KENC0(&net)].pad
                        : lin[LIN_KENC1(&net)].pad;
    const long kpmax = (max_k + VW - 1) / VW * VW;
    const size_t sizes[NSLOT] = {
        (size_t)(max_n * wide),      (size_t)(max_n * Hp),   (size_t)(max_n * Hp),
        (size_t)(max_n * NHp),       (size_t)(max_k * kw + 1), (size_t)(max_k * kw + 1),
        (size_t)(Hk * kpmax + 1),    (size_t)(max_n * kpmax + 1),
        (size_t)(max_n * max_k + 1), (size_t)max_n,          (size_t)max_n,
        (size_t)(2 * Hp),            (size_t)lin[LIN_GH0(&net)].pad, (size_t)VW};
    size_t total = 0;
    for (int i = 0; i < NSLOT; i++)
        total += (sizes[i] + 15) / 16 * 16;
    mem = scratch_alloc(total);
    if (!mem) {
        PyErr_NoMemory();
        goto done;
    }
    Scratch s;
    float **slots[NSLOT] = {&s.a,    &s.h,      &s.t, &s.nh,   &s.ka, &s.ke, &s.ket,
                            &s.dots, &s.pair, &s.rowmax, &s.e, &s.pool, &s.g1, &s.g2};
    {
        float *p = mem;
        for (int i = 0; i < NSLOT; i++) {
            *slots[i] = p;
            p += (sizes[i] + 15) / 16 * 16;
        }
    }

    float *opair = (float *)PyByteArray_AS_STRING(out[0]);
    float *otp = (float *)PyByteArray_AS_STRING(out[1]);
    double *oper = (double *)PyByteArray_AS_STRING(out[2]);
    Py_BEGIN_ALLOW_THREADS;
    for (Py_ssize_t g = 0; g < B; g++) {
        const Py_buffer *v = views + g * NG;
        const int n = (int)shape[3 * g], k = (int)shape[3 * g + 2];
        graph_forward(&net, &s, n, k, v[GX].buf, (const int64_t *)v[GCROW].buf + 1, v[GCOL].buf,
                      v[GVAL].buf, v[GKX].buf, v[GTGT].buf, opair, otp, oper + 6 * g);
        opair += (long)n * k;
        otp += n;
    }
    Py_END_ALLOW_THREADS;
    ret = PyTuple_Pack(4, out[0], out[1], out[2], out[3]);

done:
    free(mem);
    if (views)
        for (Py_ssize_t i = 0; i < B * NG; i++)
            if (views[i].obj)
                PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(shape);
    for (int i = 0; i < 4; i++)
        Py_XDECREF(out[i]);
    PyBuffer_Release(&pb);
    PyBuffer_Release(&lb);
    return ret;
}

static PyMethodDef methods[] = {
    {"forward", forward, METH_VARARGS,
     "Fused per-graph serving forward (see tamiyo/policy/fused.py)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fused",
                                    "Native fused forward of the GCN policy (CPU).", -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
