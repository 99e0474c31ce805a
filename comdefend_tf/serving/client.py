"""A TF Serving client for exported ComDefend models: REST (JSON) and gRPC (PredictRequest).

Requests are *built* by pure functions (testable offline, no server) and *sent* by separate
ones. The signatures and their input names are those of ``comdefend_tf.serving.signatures``:

* ``purify`` / ``classify`` / ``serving_default``: input ``images``, float32 ``[batch, height,
  width, C]`` in [0, 1];
* ``purify_bytes``: input ``image_bytes``, a list of encoded PNG/JPEG files (``bytes``).

REST bodies use the columnar form ``{"signature_name": ..., "inputs": {name: value}}``
(``row_format=True`` gives ``{"instances": [...]}``); bytes travel as ``{"b64": ...}``, as TF
Serving's REST API requires. Responses are turned back into numpy arrays (string outputs as
``bytes``; TF Serving returns outputs whose name ends in ``_bytes`` as ``{"b64": ...}``).

``rest_request_to_tensors`` and ``grpc_request_to_tensors`` do what a model server does with a
request (JSON or TensorProto -> tensors), so requests can be checked against a loaded
SavedModel without a server.
"""

from __future__ import annotations

import base64
import os
from typing import Mapping, Sequence

import numpy as np

from comdefend_tf import optional
from comdefend_tf.serving.signatures import (
    INPUT_IMAGE_BYTES, INPUT_IMAGES, SIGNATURE_DEFAULT, SIGNATURE_PURIFY_BYTES)

PROTOCOLS = ("rest", "grpc")
DEFAULT_REST_PORT = 8501
DEFAULT_GRPC_PORT = 8500


def input_name_for(signature_name: str) -> str:
    """The input name of an exported signature: ``image_bytes`` for ``purify_bytes``, else
    ``images``."""
    return INPUT_IMAGE_BYTES if signature_name == SIGNATURE_PURIFY_BYTES else INPUT_IMAGES


def _as_images(images) -> np.ndarray:
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be float32 [batch, height, width, channels] in [0, 1], "
                         f"got shape {images.shape}")
    return images


def _as_bytes_list(encoded_images: Sequence[bytes]) -> list[bytes]:
    if isinstance(encoded_images, (bytes, bytearray)):
        raise ValueError("image_bytes must be a list of encoded images, got one bytes object; "
                         "wrap it in a list")
    encoded = [bytes(item) for item in encoded_images]
    if not encoded:
        raise ValueError("image_bytes must hold at least one encoded image")
    return encoded


# ------------------------------------------------------------------------------------ REST
def rest_predict_url(server: str, model_name: str, version: int | None = None) -> str:
    """``http://SERVER/v1/models/MODEL[/versions/N]:predict`` (``server`` is ``host:port`` or a
    full ``http(s)://`` base URL)."""
    base = server if server.startswith(("http://", "https://")) else f"http://{server}"
    version_part = f"/versions/{int(version)}" if version is not None else ""
    return f"{base.rstrip('/')}/v1/models/{model_name}{version_part}:predict"


def build_rest_request(signature_name: str, values, row_format: bool = False) -> dict:
    """The JSON body of a REST ``:predict`` call.

    Args:
      signature_name: ``purify``, ``purify_bytes``, ``classify`` or ``serving_default``.
      values: float32 images ``[batch, height, width, C]`` in [0, 1], or for ``purify_bytes`` a
        list of encoded PNG/JPEG files (``bytes``).
      row_format: ``{"instances": [...]}`` (one entry per image) instead of the columnar
        ``{"inputs": {name: ...}}``.

    Returns:
      a JSON-serialisable dict.
    """
    input_name = input_name_for(signature_name)
    if input_name == INPUT_IMAGE_BYTES:
        column = [{"b64": base64.b64encode(item).decode("ascii")}
                  for item in _as_bytes_list(values)]
    else:
        column = _as_images(values).tolist()
    body = {"signature_name": signature_name}
    if row_format:
        body["instances"] = column
    else:
        body["inputs"] = {input_name: column}
    return body


def _decode_json_value(value):
    if isinstance(value, dict):
        if set(value) != {"b64"}:
            raise ValueError(f"a JSON object in a tensor must be {{'b64': ...}}, got keys "
                             f"{sorted(value)}")
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [_decode_json_value(item) for item in value]
    return value


def _json_to_array(value, dtype=None) -> np.ndarray:
    decoded = _decode_json_value(value)
    if dtype is not None and np.dtype(dtype) == np.dtype(object):
        array = np.empty(len(decoded), dtype=object)
        array[:] = decoded
        return array
    if _holds_bytes(decoded):
        array = np.empty(len(decoded), dtype=object)
        array[:] = decoded
        return array
    return np.asarray(decoded, dtype=dtype)


def _holds_bytes(value) -> bool:
    while isinstance(value, list) and value:
        value = value[0]
    return isinstance(value, bytes)


def rest_request_to_tensors(body: Mapping, input_dtypes: Mapping[str, object]) -> dict:
    """What TF Serving makes of a REST body: ``{input name: numpy array}``.

    ``input_dtypes`` maps the signature's input names to dtypes (``np.float32``, ``object`` for
    strings). Columnar (``inputs``) and row (``instances``) bodies are accepted; ``{"b64": ...}``
    objects become ``bytes``. A row body for a single-input signature may list bare values.
    """
    if "inputs" in body:
        inputs = body["inputs"]
        if not isinstance(inputs, dict):
            if len(input_dtypes) != 1:
                raise ValueError("a bare 'inputs' value needs a single-input signature")
            inputs = {next(iter(input_dtypes)): inputs}
        return {name: _json_to_array(inputs[name], input_dtypes[name]) for name in input_dtypes}
    if "instances" in body:
        instances = body["instances"]
        if instances and isinstance(instances[0], dict) and set(instances[0]) != {"b64"}:
            return {name: _json_to_array([row[name] for row in instances], input_dtypes[name])
                    for name in input_dtypes}
        if len(input_dtypes) != 1:
            raise ValueError("bare instances need a single-input signature")
        name = next(iter(input_dtypes))
        return {name: _json_to_array(instances, input_dtypes[name])}
    raise ValueError("a REST predict body needs 'inputs' or 'instances'")


def parse_rest_response(response: Mapping) -> dict:
    """A REST ``:predict`` response -> ``{output name: numpy array}``.

    Columnar responses (``{"outputs": ...}``) and row responses (``{"predictions": ...}``) are
    both handled; a single unnamed output comes back under the key ``"output"``.

    Raises:
      RuntimeError: with the server's message when the response is ``{"error": ...}``.
    """
    if "error" in response:
        raise RuntimeError(f"TF Serving returned an error: {response['error']}")
    if "outputs" in response:
        outputs = response["outputs"]
        if isinstance(outputs, dict):
            return {name: _json_to_array(value) for name, value in outputs.items()}
        return {"output": _json_to_array(outputs)}
    if "predictions" in response:
        predictions = response["predictions"]
        if predictions and isinstance(predictions[0], dict) and set(predictions[0]) != {"b64"}:
            return {name: _json_to_array([row[name] for row in predictions])
                    for name in predictions[0]}
        return {"output": _json_to_array(predictions)}
    raise ValueError(f"unexpected REST response keys: {sorted(response)}")


def send_rest(url: str, body: Mapping, timeout_s: float = 60.0) -> dict:
    """POSTs ``body`` to ``url`` and returns the parsed outputs (``parse_rest_response``).

    Raises:
      RuntimeError: the server answered with an error (its message included).
      requests.RequestException: the server could not be reached.
    """
    requests = optional.require("requests", "client", "the REST client")
    reply = requests.post(url, json=body, timeout=timeout_s)
    try:
        payload = reply.json()
    except ValueError:
        reply.raise_for_status()
        raise RuntimeError(f"non-JSON reply from {url}: {reply.text[:200]!r}")
    return parse_rest_response(payload)


# ------------------------------------------------------------------------------------ gRPC
def build_grpc_request(model_name: str, signature_name: str, values,
                       version: int | None = None):
    """A ``tensorflow_serving.apis.predict_pb2.PredictRequest``.

    Args:
      model_name: the served model's name (``--model_name`` of the server).
      signature_name, values: as for ``build_rest_request`` (float32 images, or a list of
        encoded PNG/JPEG ``bytes`` for ``purify_bytes``).
      version: a specific version; None lets the server pick the latest.
    """
    import tensorflow as tf

    predict_pb2 = optional.require("tensorflow_serving.apis.predict_pb2", None,
                                   "the gRPC client")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    input_name = input_name_for(signature_name)
    if input_name == INPUT_IMAGE_BYTES:
        encoded = _as_bytes_list(values)
        proto = tf.make_tensor_proto(encoded, dtype=tf.string, shape=[len(encoded)])
    else:
        proto = tf.make_tensor_proto(_as_images(values), dtype=tf.float32)
    request.inputs[input_name].CopyFrom(proto)
    return request


def grpc_request_to_tensors(request) -> dict:
    """What a model server makes of a ``PredictRequest``: ``{input name: numpy array}``
    (strings as ``bytes`` objects)."""
    import tensorflow as tf

    return {name: tf.make_ndarray(proto) for name, proto in request.inputs.items()}


def parse_grpc_response(response) -> dict:
    """A ``PredictResponse`` -> ``{output name: numpy array}`` (strings as ``bytes``)."""
    import tensorflow as tf

    return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}


def send_grpc(server: str, request, timeout_s: float = 60.0) -> dict:
    """Sends a ``PredictRequest`` to ``server`` (``host:port``, insecure channel) and returns
    the parsed outputs (``parse_grpc_response``).

    Raises:
      grpc.RpcError: the server refused the request (its details say why) or is unreachable.
    """
    grpc = optional.require("grpc", "client", "the gRPC client")
    prediction_service_pb2_grpc = optional.require(
        "tensorflow_serving.apis.prediction_service_pb2_grpc", None, "the gRPC client")
    # Purified images can exceed gRPC's default 4 MiB message limit.
    options = [("grpc.max_send_message_length", 512 << 20),
               ("grpc.max_receive_message_length", 512 << 20)]
    with grpc.insecure_channel(server, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout_s)
    return parse_grpc_response(response)


class ResponseMismatchError(RuntimeError):
    """The server answered with another number of results than images were sent."""


def check_output_counts(outputs: Mapping, sent: int) -> None:
    """Every output of our signatures has one entry per image sent (``purified``,
    ``code_bits``, ``purified_png_bytes``, ``probabilities``, ``class_ids``).

    Raises:
      ResponseMismatchError: naming the output and both counts, when any output has fewer or
        more entries than ``sent`` (or is a scalar), or when there is no output at all.
    """
    if not outputs:
        raise ResponseMismatchError(f"the server returned no outputs for {sent} image(s)")
    for name, value in outputs.items():
        shape = np.shape(value)
        count = shape[0] if shape else None
        if count != sent:
            got = "a scalar" if count is None else f"{count} result(s)"
            raise ResponseMismatchError(
                f"the server returned {got} in output {name!r} for {sent} image(s) sent; "
                "refusing to pair results with inputs")


def sent_count(signature_name: str, values) -> int:
    """How many images a request built from ``values`` carries."""
    if input_name_for(signature_name) == INPUT_IMAGE_BYTES:
        return len(_as_bytes_list(values))
    return int(_as_images(values).shape[0])


def predict(server: str, model_name: str, values, signature_name: str = SIGNATURE_DEFAULT,
            protocol: str = "rest", version: int | None = None, timeout_s: float = 60.0) -> dict:
    """Builds and sends one request; returns ``{output name: numpy array}``, each with one
    entry per image sent.

    Raises:
      ResponseMismatchError: the server returned fewer or more results than images sent.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if protocol == "rest":
        outputs = send_rest(rest_predict_url(server, model_name, version),
                            build_rest_request(signature_name, values), timeout_s)
    else:
        outputs = send_grpc(server, build_grpc_request(model_name, signature_name, values,
                                                       version), timeout_s)
    check_output_counts(outputs, sent_count(signature_name, values))
    return outputs


# ------------------------------------------------------------------------ output files
def output_paths_for(input_paths: Sequence[str], output_dir: str,
                     overwrite: bool = False) -> list[str]:
    """``OUTPUT_DIR/NAME.png`` for every input ``NAME.ext``, refusing any that could destroy
    an input.

    Raises:
      ValueError: ``output_dir`` resolves (symbolic links and ``..`` followed) to the folder
        of an input, an output path resolves to an input file, or two inputs share a name.
        ``overwrite`` does not lift these.
      FileExistsError: an output exists and ``overwrite`` is False.
    """
    resolved_inputs = {os.path.realpath(path): path for path in input_paths}
    input_folders = {os.path.dirname(resolved): path for resolved, path in resolved_inputs.items()}
    resolved_dir = os.path.realpath(output_dir)
    if resolved_dir in input_folders:
        raise ValueError(f"--output_dir {output_dir!r} is the folder of input "
                         f"{input_folders[resolved_dir]!r}; purified images could overwrite "
                         "the inputs, so write them to another folder (--overwrite does not "
                         "change this)")
    names = [os.path.splitext(os.path.basename(path))[0] + ".png" for path in input_paths]
    outputs = [os.path.join(output_dir, name) for name in names]
    if len(set(outputs)) != len(outputs):
        raise ValueError("two inputs share a file name; their outputs would collide")
    for output in outputs:
        if os.path.realpath(output) in resolved_inputs:
            raise ValueError(f"output {output!r} resolves to input "
                             f"{resolved_inputs[os.path.realpath(output)]!r}; refusing to "
                             "overwrite an input (--overwrite does not change this)")
    if not overwrite:
        existing = [path for path in outputs if os.path.lexists(path)]
        if existing:
            raise FileExistsError(f"{existing[0]} exists; pass --overwrite to replace it")
    return outputs
