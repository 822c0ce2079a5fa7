"""What an uploaded TorchScript model may do: pure tensor computation, nothing else.

A TorchScript archive is code. Its methods can call any operator registered with torch, and
some of those touch the world outside the tensors: ``aten::from_file`` maps any file into a
tensor (reading or overwriting it), ``aten::save`` writes one, ``prim::Print`` prints,
``aten::wait``/``prim::fork`` start threads, custom ops run native code. Before a model runs we
walk every node of every method graph, with the calls into submodules and functions inlined, and
refuse the model if any node is not on ``ALLOWED_OPERATIONS``.

Methods named ``__setstate__`` even run while ``torch.jit.load`` reads the archive, before any
graph can be checked; ``check_archive`` refuses archives that define one, reading only the zip.

This is the first of two layers: the engine also runs sandboxed (worker/sandbox.py), so an
operation that slips through still cannot reach files, the network or other jobs.
"""

import zipfile
import zlib
from pathlib import Path

import torch

from .errors import InputError

# More TorchScript source than any real classifier has (a ResNet-152 has about 1 MiB).
MAX_CODE_BYTES = 64 * 1024**2

# Node kinds (operator names without overloads) a model may use, grouped by purpose. Anything
# else is refused: extend this list only with operations that compute on tensors and values
# alone, never with ones that do I/O, touch storage or memory addresses, or start threads.
ALLOWED_OPERATIONS = frozenset({
    # Convolutions, matrix products, attention.
    "aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::conv_transpose1d", "aten::conv_transpose2d",
    "aten::conv_transpose3d", "aten::_convolution", "aten::convolution", "aten::linear", "aten::bilinear",
    "aten::matmul", "aten::mm", "aten::bmm", "aten::mv", "aten::dot", "aten::addmm", "aten::addmv",
    "aten::addbmm", "aten::baddbmm", "aten::einsum", "aten::scaled_dot_product_attention",
    "aten::_native_multi_head_attention", "aten::embedding", "aten::one_hot", "aten::cosine_similarity",
    "aten::pairwise_distance", "aten::cdist", "aten::channel_shuffle",
    # Activations.
    "aten::relu", "aten::relu_", "aten::relu6", "aten::leaky_relu", "aten::leaky_relu_", "aten::elu",
    "aten::elu_", "aten::selu", "aten::selu_", "aten::celu", "aten::celu_", "aten::gelu", "aten::silu",
    "aten::silu_", "aten::mish", "aten::mish_", "aten::sigmoid", "aten::sigmoid_", "aten::tanh",
    "aten::tanh_", "aten::hardtanh", "aten::hardtanh_", "aten::hardsigmoid", "aten::hardsigmoid_",
    "aten::hardswish", "aten::hardswish_", "aten::softplus", "aten::softsign", "aten::prelu",
    "aten::glu", "aten::log_sigmoid", "aten::threshold", "aten::threshold_", "aten::clamp",
    "aten::clamp_", "aten::clamp_min", "aten::clamp_min_", "aten::clamp_max", "aten::clamp_max_",
    "aten::clip", "aten::softmax", "aten::log_softmax", "aten::_softmax",
    # Pooling, padding, resampling.
    "aten::max_pool1d", "aten::max_pool2d", "aten::max_pool3d", "aten::max_pool2d_with_indices",
    "aten::avg_pool1d", "aten::avg_pool2d", "aten::avg_pool3d", "aten::adaptive_avg_pool1d",
    "aten::adaptive_avg_pool2d", "aten::adaptive_avg_pool3d", "aten::adaptive_max_pool1d",
    "aten::adaptive_max_pool2d", "aten::adaptive_max_pool3d", "aten::pad", "aten::constant_pad_nd",
    "aten::reflection_pad1d", "aten::reflection_pad2d", "aten::replication_pad1d",
    "aten::replication_pad2d", "aten::upsample_nearest1d", "aten::upsample_nearest2d",
    "aten::upsample_nearest3d", "aten::_upsample_nearest_exact1d", "aten::_upsample_nearest_exact2d",
    "aten::_upsample_nearest_exact3d", "aten::upsample_linear1d", "aten::upsample_bilinear2d",
    "aten::upsample_bicubic2d", "aten::upsample_trilinear3d", "aten::_upsample_bilinear2d_aa",
    "aten::_upsample_bicubic2d_aa", "aten::_upsample_lanczos2d_aa", "aten::pixel_shuffle",
    "aten::pixel_unshuffle", "aten::affine_grid_generator", "aten::grid_sampler",
    # Normalisation and dropout.
    "aten::batch_norm", "aten::instance_norm", "aten::layer_norm", "aten::group_norm", "aten::rms_norm",
    "aten::norm", "aten::linalg_vector_norm", "aten::dropout", "aten::dropout_", "aten::feature_dropout",
    "aten::feature_dropout_", "aten::alpha_dropout", "aten::alpha_dropout_",
    "aten::feature_alpha_dropout", "aten::feature_alpha_dropout_",
    # Shapes, views, joining and indexing.
    "aten::size", "aten::dim", "aten::numel", "aten::view", "aten::view_as", "aten::reshape",
    "aten::reshape_as", "aten::flatten", "aten::unflatten", "aten::squeeze", "aten::squeeze_",
    "aten::unsqueeze", "aten::unsqueeze_", "aten::permute", "aten::transpose", "aten::transpose_",
    "aten::t", "aten::contiguous", "aten::expand", "aten::expand_as", "aten::repeat", "aten::tile",
    "aten::cat", "aten::concat", "aten::stack", "aten::split", "aten::chunk", "aten::unbind",
    "aten::narrow", "aten::select", "aten::slice", "aten::index", "aten::index_select", "aten::gather",
    "aten::scatter", "aten::scatter_add", "aten::index_put_", "aten::masked_fill", "aten::masked_fill_",
    "aten::masked_select", "aten::where", "aten::flip", "aten::roll", "aten::movedim", "aten::tril",
    "aten::triu", "aten::detach", "aten::clone", "aten::copy_", "aten::to", "aten::type_as",
    "aten::float", "aten::long", "aten::int", "aten::bool", "aten::half", "aten::cpu", "aten::cuda",
    # New tensors (torch.empty's leftover memory can only be this job's: the engine runs alone in
    # its process; torchvision's stochastic depth uses it).
    "aten::empty", "aten::empty_like", "aten::new_empty", "aten::zeros", "aten::zeros_like", "aten::ones",
    "aten::ones_like", "aten::full", "aten::full_like",
    "aten::new_zeros", "aten::new_ones", "aten::new_full", "aten::arange", "aten::linspace", "aten::eye",
    "aten::tensor", "aten::scalar_tensor", "aten::rand", "aten::rand_like", "aten::randn",
    "aten::randn_like", "aten::bernoulli", "aten::bernoulli_",
    # Arithmetic and element-wise functions.
    "aten::add", "aten::add_", "aten::sub", "aten::sub_", "aten::rsub", "aten::mul", "aten::mul_",
    "aten::div", "aten::div_", "aten::floor_divide", "aten::floordiv", "aten::remainder", "aten::fmod",
    "aten::neg", "aten::abs", "aten::pow", "aten::sqrt", "aten::rsqrt", "aten::square", "aten::exp",
    "aten::log", "aten::log2", "aten::log10", "aten::log1p", "aten::expm1", "aten::reciprocal",
    "aten::sign", "aten::floor", "aten::ceil", "aten::round", "aten::trunc", "aten::frac", "aten::sin",
    "aten::cos", "aten::tan", "aten::atan", "aten::atan2", "aten::erf", "aten::erfc", "aten::maximum",
    "aten::minimum", "aten::lerp", "aten::addcmul", "aten::addcdiv", "aten::isnan", "aten::isinf",
    "aten::isfinite", "aten::nan_to_num",
    # Comparisons and logic (on tensors and on plain values).
    "aten::eq", "aten::ne", "aten::lt", "aten::le", "aten::gt", "aten::ge", "aten::logical_and",
    "aten::logical_or", "aten::logical_not", "aten::logical_xor", "aten::__and__", "aten::__or__",
    "aten::__xor__", "aten::__not__", "aten::__is__", "aten::__isnot__", "aten::__contains__",
    # Reductions and sorting.
    "aten::sum", "aten::mean", "aten::std", "aten::var", "aten::std_mean", "aten::var_mean",
    "aten::prod", "aten::max", "aten::min", "aten::amax", "aten::amin", "aten::argmax", "aten::argmin",
    "aten::logsumexp", "aten::cumsum", "aten::cumprod", "aten::topk", "aten::sort", "aten::argsort",
    "aten::all", "aten::any",
    # Plain values: numbers, lists, tuples, dicts and the strings of error messages.
    "aten::Int", "aten::Float", "aten::Bool", "aten::ScalarImplicit", "aten::item", "aten::len",
    "aten::__getitem__", "aten::_set_item", "aten::append", "aten::list", "aten::__range_length",
    "aten::__derive_index", "aten::format", "aten::str", "aten::is_floating_point",
    "aten::is_grad_enabled", "aten::is_autocast_enabled",
    # Warnings raised by torch's own functions (F.interpolate, attention); they reach only the
    # worker's log.
    "aten::warn",
    # The interpreter's own nodes: constants, attributes, control flow, tuples and lists, types.
    # Not prim::CreateObject, prim::Enter or prim::Exit: a `with` block (even torch.no_grad())
    # runs __enter__/__exit__ code that no graph walked here contains.
    "prim::Constant", "prim::GetAttr", "prim::SetAttr", "prim::If", "prim::Loop", "prim::ListConstruct",
    "prim::ListUnpack", "prim::TupleConstruct", "prim::TupleUnpack", "prim::TupleIndex",
    "prim::DictConstruct", "prim::unchecked_cast", "prim::Uninitialized", "prim::RaiseException",
    "prim::NumToTensor", "prim::device", "prim::dtype", "prim::is_cuda", "prim::is_nested",
    "prim::requires_grad", "prim::type", "prim::isinstance", "prim::min", "prim::max", "prim::abs",
})


def check_archive(path: Path) -> None:
    """Refuses a TorchScript archive that would run code while being loaded. Reads every zip
    entry, duplicates included: a reader that picked another copy could otherwise be fooled."""
    try:
        with zipfile.ZipFile(path) as archive:
            sources = [info for info in archive.infolist() if info.filename.endswith(".py")]
            too_large = sum(info.file_size for info in sources) > MAX_CODE_BYTES
            code = [] if too_large else [(info.filename, archive.read(info)) for info in sources]
    except (OSError, zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, zlib.error) as e:
        raise InputError(f"cannot read the TorchScript archive {path.name}: {e}") from e
    if too_large:
        raise InputError(f"the code in {path.name} is larger than {MAX_CODE_BYTES // 1024**2} MiB")
    for name, text in code:
        if b"__setstate__" in text:
            raise InputError(f"{path.name} defines __setstate__ (in {name}), code that would run while "
                             "the archive is loaded; export the model without custom "
                             "__getstate__/__setstate__ methods")


def check_operations(module: torch.jit.ScriptModule) -> None:
    """Raises InputError naming the first operation of ``module`` that is not allowed."""
    for where, graph in method_graphs(module):
        for node in nodes(graph.block()):
            if node.kind() not in ALLOWED_OPERATIONS:
                raise InputError(
                    f"the model uses the operation {node.kind()} (in {where}), which is not allowed: "
                    "uploaded models may only compute on tensors (convolutions, matrix products, "
                    "activations, pooling, normalisation, shape and arithmetic operations), not "
                    "touch files, the system, threads, printing or storage")


def method_graphs(module: torch.jit.ScriptModule):
    """(name, graph with every call inlined) for each method and hook of each submodule."""
    for name, submodule in module.named_modules():
        methods = [(m, submodule._c._get_method(m)) for m in submodule._c._method_names()]
        methods += [(f"hook {hook.name}", hook) for hook in
                    submodule._c._get_forward_hooks() + submodule._c._get_forward_pre_hooks()]
        for method_name, method in methods:
            graph = method.graph.copy()
            torch._C._jit_pass_inline(graph)
            yield f"{name}.{method_name}" if name else method_name, graph


def nodes(block):
    for node in block.nodes():
        yield node
        for inner in node.blocks():
            yield from nodes(inner)
