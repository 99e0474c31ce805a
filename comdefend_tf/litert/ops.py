"""What a ``.tflite`` file holds, read before and after an interpreter loads it.

* ``check_ops(content)``: before any interpreter parses the file, its operator table and the
  sizes its tensors declare, read with the LiteRT schema's pure-Python flatbuffer reader: only
  the ops the converter emits for a purifier (``ALLOWED_OPS``; no custom or Select TF "Flex"
  op) and at most ``MAX_DECLARED_TENSOR_BYTES``; else ``LiteRTModelError``.
* ``op_report(content)``: which ops compute in int8, which in float, and the boundaries
  between them, from an interpreter without delegates; ``draws_noise`` reads it.
* ``interpreter_class()`` / ``no_delegate_resolver()``: the LiteRT interpreter of the
  ``[litert]`` extra (``optional.MissingExtra`` without it).
"""

from __future__ import annotations

import numpy as np

from comdefend_tf import optional

_INTEGER_DTYPES = (np.int8, np.int16)
_FLOAT_DTYPES = (np.float32, np.float16)

# The only ops a file may hold: what export_litert's conversions emit (every variant, noise on
# or off), and nothing custom. A file naming any other op, a custom op or a Select TF ("Flex")
# op is refused before an interpreter sees it: with TensorFlow in the process LiteRT would run
# Flex ops (file reads and writes among them), so the file would choose what code runs.
ALLOWED_OPS = frozenset({
    "ADD", "SUB", "MUL", "CAST", "CONCATENATION", "CONV_2D", "DEQUANTIZE", "QUANTIZE", "ELU",
    "GREATER", "GREATER_EQUAL", "LOGISTIC", "RANDOM_STANDARD_NORMAL", "SHAPE", "STRIDED_SLICE",
    "PACK", "FILL", "RESHAPE"})


# What the tensors a file declares may hold in all, counted at 8 bytes per element before any
# interpreter allocates them (the paper-size purifier at a 96x96 input declares about 0.1 GiB).
MAX_DECLARED_TENSOR_BYTES = 2**30


class LiteRTModelError(ValueError):
    """A file that is not a usable converted ComDefend purifier."""


def check_ops(content: bytes) -> None:
    """Refuses (``LiteRTModelError``) a file whose operator codes name anything outside
    ``ALLOWED_OPS`` (custom ops, Select TF ops, other builtins) or whose tensors declare more
    than ``MAX_DECLARED_TENSOR_BYTES``. Read with the LiteRT schema's pure-Python flatbuffer
    reader, before any interpreter parses or allocates the file."""
    schema = optional.require("ai_edge_litert.schema_py_generated", "litert",
                              "the LiteRT purifier")
    names = {value: name for name, value in vars(schema.BuiltinOperator).items()
             if not name.startswith("_")}
    try:
        model = schema.Model.GetRootAs(content, 0)
        codes = [model.OperatorCodes(index) for index in range(model.OperatorCodesLength())]
        found = {(names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "UNKNOWN"),
                  code.CustomCode()) for code in codes}
        declared = 0
        for graph_index in range(model.SubgraphsLength()):
            graph = model.Subgraphs(graph_index)
            for tensor_index in range(graph.TensorsLength()):
                tensor = graph.Tensors(tensor_index)
                elements = 1
                for axis in range(tensor.ShapeLength()):
                    elements *= max(int(tensor.Shape(axis)), 1)  # Python ints: no wrap
                declared += 8 * elements
    except Exception as error:  # a malformed buffer fails anywhere in the reader
        raise LiteRTModelError(f"not a LiteRT model: its operator table cannot be read "
                               f"({type(error).__name__})") from None
    if declared > MAX_DECLARED_TENSOR_BYTES:
        raise LiteRTModelError(f"the model declares tensors of {declared:,} bytes, over the "
                               f"{MAX_DECLARED_TENSOR_BYTES:,}-byte limit for a purifier")
    refused = sorted(name if custom is None else
                     f"custom op {custom[:64].decode('ascii', 'replace')!r}"
                     for name, custom in found if custom is not None or name not in ALLOWED_OPS)
    if refused:
        raise LiteRTModelError("the model holds ops a converted ComDefend purifier never has, "
                               f"refused before loading: {', '.join(refused)}")


def interpreter_class():
    """``ai_edge_litert.interpreter.Interpreter`` (the ``[litert]`` extra)."""
    return optional.require("ai_edge_litert.interpreter", "litert",
                            "the LiteRT purifier").Interpreter


def no_delegate_resolver():
    """The op resolver without default delegates (XNNPACK off): the model's own op list."""
    return optional.require("ai_edge_litert.interpreter", "litert",
                            "the LiteRT purifier").OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES


def _classify(operand_types, result_types) -> str:
    if result_types and all(np.dtype(t).type is np.int32 for t in result_types):
        return "other"  # shape arithmetic (SHAPE, STRIDED_SLICE, CONCATENATION of sizes)
    types = [np.dtype(t).type for t in [*operand_types, *result_types]]
    integer = any(t in _INTEGER_DTYPES for t in types)
    floating = any(t in _FLOAT_DTYPES for t in types)
    if integer and floating:
        return "boundary"
    return "int8" if integer else "float" if floating else "other"


def op_report(model_content: bytes) -> dict:
    """Which ops of a converted model compute in int8 and which in float.

    Read from an interpreter without delegates (so the model's own ops are listed, not the
    delegate partitions): for each op its name and the dtypes of its tensors. An op is
    ``int8`` when its tensors are integer-quantized (int8/int16, int32 biases aside),
    ``float`` when they are float, ``boundary`` when it mixes both (QUANTIZE, DEQUANTIZE, and in
    ``dynamic_int8`` the hybrid ops that take int8 weights and float activations), ``other``
    for integer-only shape arithmetic (SHAPE, a bool comparison and its cast).

    Returns:
      dict with ``ops`` (list of ``{"op", "class", "inputs", "outputs"}`` in execution order),
      ``counts`` (class -> number of ops), ``int8_ops`` / ``float_ops`` / ``boundary_ops``
      (sorted op names per class) and ``bytes`` (the model size).
    """
    interpreter = interpreter_class()(model_content=model_content,
                                      experimental_op_resolver_type=no_delegate_resolver())
    interpreter.allocate_tensors()
    ops = []
    for details in interpreter._get_ops_details():  # the interpreter's public-in-practice list
        operands = [np.dtype(t).name for t in details["operand_types"]]
        results = [np.dtype(t).name for t in details["result_types"]]
        # int32 operands are biases or shapes: they do not decide the class.
        kept = [t for t in details["operand_types"] if np.dtype(t).type is not np.int32]
        ops.append({"op": details["op_name"],
                    "class": _classify(kept, details["result_types"]),
                    "inputs": operands, "outputs": results})
    report = {"ops": ops, "bytes": len(model_content), "counts": {}}
    for kind in ("int8", "float", "boundary", "other"):
        names = sorted({op["op"] for op in ops if op["class"] == kind})
        report[f"{kind}_ops"] = names
        report["counts"][kind] = sum(op["class"] == kind for op in ops)
    return report


def draws_noise(model_content: bytes) -> bool:
    """Whether a converted model holds a random-normal op (its purification is randomized)."""
    return any(op["op"] == "RANDOM_STANDARD_NORMAL" for op in op_report(model_content)["ops"])
