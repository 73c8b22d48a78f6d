/* The autograd nodes of the compiled GroupNorm kernels (group_norm_nchw.c, group_norm_channels_last.c) and LayerNorm
 * kernels (row_norms.c), in C++, and GroupNorm's whole call (group_norm_call).
 *
 * The same forward and backward as normlayers.cpu's Python autograd.Functions, without their Python: from
 * the call to the returned output, and in the backward, nothing runs in the interpreter. Called right after other
 * layers (caches cold), the Python Function and its glue took 100-200 µs of a training step more than this node
 * (2×320×32×32 and 8×1280×8×8 on a Zen 4 core, one and two threads, malloc's trimming off so that page faults do not
 * decide): as much as the kernels win over ATen's, while eager's own node costs about nothing. The kernels are the C
 * files' (their addresses handed over by set_kernels, from the ctypes libraries normlayers loads): one copy of the
 * math.
 *
 * Backward: the compiled backward from the forward's (2, N, G) statistics; a double backward (grad mode on in the
 * backward: create_graph) or a kernel that could not allocate its scratch runs autograd of ATen's group norm and the
 * activation on the fp32 upcast instead, as the Python Function does. */
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/extension.h>

#include <array>
#include <cmath>
#include <optional>

namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using NchwForward = void (*)(const void* x, int x_bf16, const void* w, const void* b, int p_bf16, void* y,
                             float* mean, float* rstd, int64_t N, int64_t C, int64_t HW, int64_t G, float eps, int act,
                             int threads);
using NchwBackward = void (*)(const void* dy, const void* x, int bf16, const void* w, const void* b, int p_bf16,
                              const float* mean, const float* rstd, void* dx, float* dw, float* db, double* sums,
                              int64_t N, int64_t C, int64_t HW, int64_t G, int act, int threads);
using ChannelsLastForward = int (*)(const void* x, void* y, int bf16, const float* w, const float* b, double* mean,
                                    double* rstd, int64_t N, int64_t P, int64_t C, int64_t G, double eps, int act,
                                    int threads);
using ChannelsLastBackward = int (*)(const void* dy, const void* x, void* dx, int bf16, const float* w,
                                     const float* b, const double* mean, const double* rstd, float* dw, float* db,
                                     int64_t N, int64_t P, int64_t C, int64_t G, int act, int threads);

using RowNormForward = int64_t (*)(const void* rows, const void* residual, void* h, int bf16, const void* w,
                                   const void* b, int p_bf16, void* y, float* mean, float* rstd, int64_t M, int64_t N,
                                   float eps, int rms, int threads);
using LayerNormBackward = int (*)(const void* x, const void* dy, int bf16, const float* w, const float* mean,
                                  const float* rstd, void* dx, float* dw, float* db, int64_t M, int64_t N, int threads);

NchwForward nchw_forward = nullptr;
NchwBackward nchw_backward = nullptr;
ChannelsLastForward channels_last_forward = nullptr;
ChannelsLastBackward channels_last_backward = nullptr;
RowNormForward row_norm_forward = nullptr;
LayerNormBackward layer_norm_backward = nullptr;

enum Activation { ACT_NONE = 0, ACT_SILU = 1, ACT_RELU = 2 };  // the kernels' codes

void* pointer(const std::optional<Tensor>& t) { return t && t->defined() ? t->data_ptr() : nullptr; }

bool is_bf16(const Tensor& t) { return t.scalar_type() == at::kBFloat16; }

/* A weight or bias as the channels-last kernels read it: C contiguous fp32 values. */
std::optional<Tensor> fp32_param(const std::optional<Tensor>& p) {
    if (!p || !p->defined() || (p->scalar_type() == at::kFloat && p->is_contiguous())) return p;
    return p->detach().to(at::kFloat).contiguous();
}

/* The kernel's fp32 gradient of a weight or bias, in the parameter's dtype (undefined where not asked for). */
Tensor param_grad(const Tensor& grad, const std::optional<Tensor>& param) {
    return grad.defined() && param->scalar_type() != at::kFloat ? grad.to(param->scalar_type()) : grad;
}

/* A saved weight or bias: undefined where there was none. */
std::optional<Tensor> present(const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; }

/* Which of x, weight and bias want a gradient (an absent weight or bias has no edge: the bias's is 1 without a
 * weight). */
std::array<bool, 3> input_needs(AutogradContext* ctx, const std::optional<Tensor>& weight,
                                const std::optional<Tensor>& bias) {
    return {ctx->needs_input_grad(0), weight && ctx->needs_input_grad(1),
            bias && ctx->needs_input_grad(weight ? 2 : 1)};
}

/* Whether t's memory holds its values as they are: strided, no negative or conjugate bit. */
bool plain_memory(const Tensor& t) { return t.layout() == at::kStrided && !t.is_neg() && !t.is_conj(); }

/* Whether a backward may run the kernel on this gradient: not a double backward (grad mode on), and memory a kernel
 * reads as it is. */
bool kernel_takes(const Tensor& dy) { return !at::GradMode::is_enabled() && plain_memory(dy); }

/* The kernels' gradient outputs: dx like x, dweight and dbias as `width` fp32 values, each only where asked for. */
struct KernelGrads {
    Tensor dx, dweight, dbias;
    KernelGrads(const Tensor& x, int64_t width, std::array<bool, 3> needs)
        : dx(needs[0] ? at::empty_like(x) : Tensor()),
          dweight(needs[1] ? at::empty({width}, x.options().dtype(at::kFloat)) : Tensor()),
          dbias(needs[2] ? at::empty({width}, x.options().dtype(at::kFloat)) : Tensor()) {}
    void* dx_ptr() const { return dx.defined() ? dx.data_ptr() : nullptr; }
    float* dweight_ptr() const { return dweight.defined() ? dweight.data_ptr<float>() : nullptr; }
    float* dbias_ptr() const { return dbias.defined() ? dbias.data_ptr<float>() : nullptr; }
    /* [dx, dweight, dbias], the parameters' in their dtypes */
    variable_list finished(const std::optional<Tensor>& weight, const std::optional<Tensor>& bias) const {
        return {dx, param_grad(dweight, weight), param_grad(dbias, bias)};
    }
};

Tensor activation(const Tensor& z, int64_t act) {
    return act == ACT_SILU ? at::silu(z) : act == ACT_RELU ? at::relu(z) : z;
}

Tensor upcast(const Tensor& t) { return t.scalar_type() == at::kFloat ? t : t.to(at::kFloat); }

std::optional<Tensor> upcast(const std::optional<Tensor>& t) {
    return t ? std::optional<Tensor>(upcast(*t)) : std::nullopt;
}

/* [dx, dweight, dbias] (undefined where not in `needs`) by autograd of `norm(x, weight, bias)`, ATen's ops on the fp32
 * upcasts, graphs kept where grad mode is on (a double backward: the saved statistics hold no graph). */
template <typename Norm>
variable_list composite_grads(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                              const Tensor& dy, std::array<bool, 3> needs, Norm norm) {
    const bool create_graph = at::GradMode::is_enabled();
    at::AutoGradMode enable_grad(true);
    const Tensor y = norm(upcast(x), upcast(weight), upcast(bias));
    variable_list leaves;
    const std::array<std::optional<Tensor>, 3> inputs = {x, weight, bias};
    for (int i = 0; i < 3; ++i)
        if (needs[i]) leaves.push_back(*inputs[i]);
    const variable_list grads = torch::autograd::grad({y}, leaves, {dy}, create_graph, create_graph);
    variable_list out(3);
    for (int i = 0, k = 0; i < 3; ++i)
        if (needs[i]) out[i] = grads[k++];
    return out;
}

/* The compiled GroupNorm forward of x (act fused): y, or undefined where the channels-last kernel could not allocate
 * its scratch memory. `statistics`, where defined, receives the (2, N, G) mean and rstd (fp64 channels-last, fp32
 * NCHW); else none are kept. x: fp32 or bf16, contiguous NCHW (channels_last false) or channels innermost and dense;
 * weight and bias of one dtype, fp32 or bf16, contiguous (NCHW: as the caller checked); act: a kernel code. */
Tensor group_norm_forward(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                          int64_t groups, double eps, int64_t act, bool channels_last, const Tensor& statistics) {
    const int64_t N = x.size(0), C = x.size(1), inner = x.numel() / (N * C);
    const int threads = at::get_num_threads();
    Tensor y = at::empty_like(x);
    if (channels_last) {
        const auto w = fp32_param(weight), b = fp32_param(bias);
        double* mean = statistics.defined() ? statistics.data_ptr<double>() : nullptr;
        if (channels_last_forward(x.data_ptr(), y.data_ptr(), is_bf16(x), static_cast<float*>(pointer(w)),
                                  static_cast<float*>(pointer(b)), mean, mean ? mean + N * groups : nullptr, N, inner,
                                  C, groups, eps, static_cast<int>(act), threads) != 0)
            return Tensor();
    } else {
        const std::optional<Tensor>& param = weight ? weight : bias;
        float* mean = statistics.defined() ? statistics.data_ptr<float>() : nullptr;
        nchw_forward(x.data_ptr(), is_bf16(x), pointer(weight), pointer(bias), param && is_bf16(*param), y.data_ptr(),
                     mean, mean ? mean + N * groups : nullptr, N, C, inner, groups, static_cast<float>(eps),
                     static_cast<int>(act), threads);
    }
    return y;
}

struct CompiledGroupNorm : public torch::autograd::Function<CompiledGroupNorm> {
    /* group_norm_forward's arguments, its statistics kept for the backward */
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                          const std::optional<Tensor>& bias, int64_t groups, double eps, int64_t act,
                          bool channels_last) {
        const Tensor statistics =
            at::empty({2, x.size(0), groups}, x.options().dtype(channels_last ? at::kDouble : at::kFloat));
        Tensor y = group_norm_forward(x, weight, bias, groups, eps, act, channels_last, statistics);
        const bool compiled = y.defined();
        if (!compiled)  // no scratch memory for the kernel: ATen's ops, and their backward
            y = activation(at::group_norm(upcast(x), groups, upcast(weight), upcast(bias), eps, true), act)
                    .to(x.scalar_type());
        ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), statistics});
        ctx->saved_data["groups"] = groups;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["act"] = act;
        ctx->saved_data["channels_last"] = channels_last;
        ctx->saved_data["compiled"] = compiled;
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        const variable_list saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &statistics = saved[3];
        const std::optional<Tensor> weight = present(saved[1]), bias = present(saved[2]);
        const int64_t groups = ctx->saved_data["groups"].toInt(), act = ctx->saved_data["act"].toInt();
        const double eps = ctx->saved_data["eps"].toDouble();
        const bool channels_last = ctx->saved_data["channels_last"].toBool();
        const std::array<bool, 3> needs = input_needs(ctx, weight, bias);
        variable_list grads;
        const Tensor& dy_in = grad_outputs[0];
        if (ctx->saved_data["compiled"].toBool() && kernel_takes(dy_in)) {
            const int64_t N = x.size(0), C = x.size(1), inner = x.numel() / (N * C);
            const int threads = at::get_num_threads();
            const KernelGrads out(x, C, needs);
            if (channels_last) {
                Tensor dy = dy_in.scalar_type() == x.scalar_type() && dy_in.strides() == x.strides()
                                ? dy_in
                                : dy_in.to(x.scalar_type()).movedim(1, -1).contiguous().movedim(-1, 1);
                const auto w = fp32_param(weight), b = fp32_param(bias);
                const double* mean = statistics.data_ptr<double>();
                if (channels_last_backward(dy.data_ptr(), x.data_ptr(), out.dx_ptr(), is_bf16(x),
                                           static_cast<float*>(pointer(w)), static_cast<float*>(pointer(b)), mean,
                                           mean + N * groups, out.dweight_ptr(), out.dbias_ptr(), N, inner, C, groups,
                                           static_cast<int>(act), threads) == 0)
                    grads = out.finished(weight, bias);
            } else {
                const Tensor dy = dy_in.to(x.scalar_type()).contiguous();
                const std::optional<Tensor>& param = weight ? weight : bias;
                Tensor sums = at::empty({N, C, 2}, x.options().dtype(at::kDouble));
                const float* mean = statistics.data_ptr<float>();
                nchw_backward(dy.data_ptr(), x.data_ptr(), is_bf16(x), pointer(weight), pointer(bias),
                              param && is_bf16(*param), mean, mean + N * groups, out.dx_ptr(), out.dweight_ptr(),
                              out.dbias_ptr(), sums.data_ptr<double>(), N, C, inner, groups, static_cast<int>(act),
                              threads);
                grads = out.finished(weight, bias);
            }
        }
        if (grads.empty())
            grads = composite_grads(x, weight, bias, dy_in, needs, [&](const Tensor& xf, const auto& w, const auto& b) {
                return activation(at::group_norm(xf, groups, w, b, eps, true), act);
            });
        return {grads[0], grads[1], grads[2], Tensor(), Tensor(), Tensor(), Tensor()};
    }
};

/* A LayerNorm forward the kernel ran before the node was made (layer_norm), handed to the node's forward: the output
 * must be made inside it (an input returned as an output would come back as a view of itself). */
thread_local Tensor pending_y, pending_mean, pending_rstd;

struct CompiledLayerNorm : public torch::autograd::Function<CompiledLayerNorm> {
    static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& weight,
                          const std::optional<Tensor>& bias, double eps) {
        Tensor y = std::move(pending_y);
        ctx->save_for_backward({x, weight.value_or(Tensor()), bias.value_or(Tensor()), std::move(pending_mean),
                                std::move(pending_rstd)});
        ctx->saved_data["eps"] = eps;
        return y;
    }

    static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
        const variable_list saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &mean = saved[3], &rstd = saved[4];
        const std::optional<Tensor> weight = present(saved[1]), bias = present(saved[2]);
        const std::array<bool, 3> needs = input_needs(ctx, weight, bias);
        const Tensor& dy_in = grad_outputs[0];
        const int64_t N = x.size(-1), M = x.numel() / N;
        if (kernel_takes(dy_in)) {
            const Tensor dy = dy_in.to(x.scalar_type()).contiguous();
            const auto w = fp32_param(weight);
            const KernelGrads out(x, N, needs);
            if (layer_norm_backward(x.data_ptr(), dy.data_ptr(), is_bf16(x), static_cast<float*>(pointer(w)),
                                    mean.data_ptr<float>(), rstd.data_ptr<float>(), out.dx_ptr(), out.dweight_ptr(),
                                    out.dbias_ptr(), M, N, at::get_num_threads()) == 0) {
                variable_list grads = out.finished(weight, bias);
                grads.push_back(Tensor());  // (eps)
                return grads;
            }
        }
        /* a double backward, a gradient the kernel cannot read, no memory for its sums: autograd of ATen's layer norm
         * on the fp32 upcast */
        const double eps = ctx->saved_data["eps"].toDouble();
        variable_list grads = composite_grads(x, weight, bias, dy_in, needs,
                                              [&](const Tensor& xf, const auto& w, const auto& b) {
                                                  return at::layer_norm(xf, {N}, w, b, eps);
                                              });
        grads.push_back(Tensor());  // (eps)
        return grads;
    }
};

/* LayerNorm over the last dim of contiguous fp32/bf16 rows (width > 1) under autograd: the compiled forward (one read,
 * its statistics checked in the same pass), then the node; where the kernel does not trust a row's statistics (or
 * has no memory for the parameters' fp32 copy), `fallback()`, the Python path's result. */
Tensor layer_norm(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                  const py::object& fallback) {
    const int64_t N = x.size(-1), M = x.numel() / N;
    const auto w = fp32_param(weight), b = fp32_param(bias);
    std::vector<int64_t> stats_shape(x.sizes().begin(), x.sizes().end());
    stats_shape.back() = 1;
    Tensor y = at::empty_like(x), mean = at::empty(stats_shape, x.options().dtype(at::kFloat)),
           rstd = at::empty(stats_shape, x.options().dtype(at::kFloat));
    int64_t untrusted;
    {
        py::gil_scoped_release release;  // (as torch's own ops: other Python threads run meanwhile)
        untrusted = row_norm_forward(x.data_ptr(), nullptr, nullptr, is_bf16(x), pointer(w), pointer(b), 0,
                                     y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), M, N,
                                     static_cast<float>(eps), 0, at::get_num_threads());
    }
    if (untrusted != 0) return fallback().cast<Tensor>();
    pending_y = std::move(y);
    pending_mean = std::move(mean);
    pending_rstd = std::move(rstd);
    return CompiledLayerNorm::apply(x, weight, bias, eps);
}

Tensor group_norm(const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                  int64_t groups, double eps, int64_t act, bool channels_last) {
    py::gil_scoped_release release;  // (no Python below)
    return CompiledGroupNorm::apply(x, weight, bias, groups, eps, act, channels_last);
}

/* The Python types whose tensors a kernel may read as they are: torch.Tensor and torch.nn.Parameter (set_types). A
 * subclass's memory need not be its data (a FakeTensor's is not). */
PyObject* tensor_type = nullptr;
PyObject* parameter_type = nullptr;

/* The tensor of a torch.Tensor or nn.Parameter object, or nullptr for anything else. */
const Tensor* plain_tensor(py::handle object) {
    const auto type = reinterpret_cast<PyObject*>(Py_TYPE(object.ptr()));
    return type == tensor_type || type == parameter_type ? &THPVariable_Unpack(object.ptr()) : nullptr;
}

/* Whether a kernel may read t's memory as it is: a strided CPU tensor with storage, no conjugate or negative bit, not
 * a torch.func transform's (wrapped, batched) or a Python subclass's. */
bool host_tensor(const Tensor& t) {
    static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::FuncTorchBatched,
                                              c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize});
    return t.device().is_cpu() && plain_memory(t) && t.has_storage() && !t.key_set().has_any(wrapped);
}

/* Whether x's channels (dim 1) are innermost and dense: the (N, *spatial, C) view contiguous, size-1 dims' strides
 * ignored, as Tensor.is_contiguous reads them (channels_last, channels_last_3d, a transposed (N, L, C)). */
bool channels_innermost(const Tensor& x) {
    int64_t expected = 1;
    for (int64_t step = 0; step < x.dim(); ++step) {
        const int64_t d = step == 0 ? 1 : step == x.dim() - 1 ? 0 : x.dim() - step;  // 1, then dim-1 … 2, then 0
        if (x.size(d) != 1 && x.stride(d) != expected) return false;
        expected *= x.size(d);
    }
    return true;
}

/* A weight or bias argument: (true, its tensor or none) where it is None or a floating (C,) host tensor, else
 * (false, none). */
std::pair<bool, std::optional<Tensor>> channel_vector(py::handle object, int64_t C) {
    if (object.is_none()) return {true, std::nullopt};
    const Tensor* t = plain_tensor(object);
    if (!t || !host_tensor(*t) || !t->is_floating_point() || t->dim() != 1 || t->size(0) != C) return {false, {}};
    return {true, *t};
}

/* functional.group_norm of a call the kernels take, from its Python arguments, in one step: the checks their path
 * needs, the kernel, and under autograd the node (CompiledGroupNorm). Where caches are cold (a layer between others)
 * the Python path to the same kernels (its checks, the dispatch, the ctypes call) took 51-156 µs more per inference
 * call than this at 1×512×64×64, 2×320×32×32 and 8×1280×8×8 channels-last, 26-53 µs more NCHW (a Zen 4 core, one
 * thread). None where the call is not one of these (another dtype, layout, activation or argument form, a torch.func
 * transform or a dispatch mode, a bad argument): the Python path takes it, with its full checks and their errors. */
py::object group_norm_call(py::handle input, py::handle num_groups, py::handle weight, py::handle bias,
                           py::handle eps, py::handle act) {
    const Tensor* x = plain_tensor(input);
    if (!x || !PyLong_CheckExact(num_groups.ptr()) || !PyFloat_CheckExact(eps.ptr())) return py::none();
    int act_code = ACT_NONE;
    if (!act.is_none()) {
        if (!PyUnicode_CheckExact(act.ptr())) return py::none();
        if (PyUnicode_CompareWithASCIIString(act.ptr(), "silu") == 0)
            act_code = ACT_SILU;
        else if (PyUnicode_CompareWithASCIIString(act.ptr(), "relu") == 0)
            act_code = ACT_RELU;
        else
            return py::none();  // (GELU runs after the kernels, in Python)
    }
    int overflow = 0;
    const int64_t groups = PyLong_AsLongLongAndOverflow(num_groups.ptr(), &overflow);
    const double epsilon = PyFloat_AS_DOUBLE(eps.ptr());
    if (overflow || !(epsilon >= 0.0 && epsilon < INFINITY)) return py::none();
    if ((x->scalar_type() != at::kFloat && x->scalar_type() != at::kBFloat16) || x->dim() < 2 || !host_tensor(*x))
        return py::none();
    const int64_t C = x->size(1), numel = x->numel();
    if (groups <= 0 || C % groups != 0 || numel == 0 || numel == groups) return py::none();
    const auto [weight_ok, w] = channel_vector(weight, C);
    const auto [bias_ok, b] = channel_vector(bias, C);
    if (!weight_ok || !bias_ok) return py::none();
    const bool nchw = x->is_contiguous();
    if (!nchw && !(x->dim() >= 3 && channels_innermost(*x))) return py::none();
    if (nchw) {  // the NCHW kernel reads the parameters as they are: one dtype, fp32 or bf16, contiguous
        const std::optional<Tensor>& p = w ? w : b;
        if (p && !((p->scalar_type() == at::kFloat || p->scalar_type() == at::kBFloat16) &&
                   (!w || w->is_contiguous()) && (!b || (b->scalar_type() == p->scalar_type() && b->is_contiguous()))))
            return py::none();
    }
    // (inside a torch.func transform its dynamic layer's keys are in the thread's included set)
    if (c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
        c10::impl::TorchDispatchModeTLS::any_modes_set())
        return py::none();
    const bool differentiable = at::GradMode::is_enabled() &&
                                (x->requires_grad() || (w && w->requires_grad()) || (b && b->requires_grad()));
    Tensor y;
    {
        py::gil_scoped_release release;  // (no Python below)
        // (inference: no statistics kept; undefined where the kernel had no scratch memory: the Python path, ATen's)
        y = differentiable ? CompiledGroupNorm::apply(*x, w, b, groups, epsilon, act_code, !nchw)
                           : group_norm_forward(*x, w, b, groups, epsilon, act_code, !nchw, Tensor());
    }
    return y.defined() ? py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y))) : py::none();
}

void set_types(py::handle tensor, py::handle parameter) {
    tensor_type = tensor.ptr();
    parameter_type = parameter.ptr();
}

void set_kernels(int64_t nchw_fwd, int64_t nchw_bwd, int64_t cl_fwd, int64_t cl_bwd, int64_t row_fwd,
                 int64_t ln_bwd) {
    row_norm_forward = reinterpret_cast<RowNormForward>(row_fwd);
    layer_norm_backward = reinterpret_cast<LayerNormBackward>(ln_bwd);
    nchw_forward = reinterpret_cast<NchwForward>(nchw_fwd);
    nchw_backward = reinterpret_cast<NchwBackward>(nchw_bwd);
    channels_last_forward = reinterpret_cast<ChannelsLastForward>(cl_fwd);
    channels_last_backward = reinterpret_cast<ChannelsLastBackward>(cl_bwd);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("layer_norm", &layer_norm, "LayerNorm over the last dim of fp32/bf16 rows by the compiled kernels, under autograd");
    m.def("group_norm", &group_norm, "GroupNorm (+ activation) of fp32/bf16 input by the compiled kernels, under autograd");
    m.def("group_norm_call", &group_norm_call,
          "functional.group_norm of a call the kernels take (inference or under autograd), or None: the Python path");
    m.def("set_types", &set_types, "torch.Tensor and torch.nn.Parameter: the types whose tensors the kernels read");
    m.def("set_kernels", &set_kernels, "the addresses of the compiled kernels (ctypes function pointers)");
}
