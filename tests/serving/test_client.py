"""The serving client: the requests it builds are accepted by the exported signatures.

Requests are converted back to tensors the way a model server does (JSON / TensorProto ->
tensors) and fed to the SavedModel's signatures. The send functions and the CLI are exercised
against small in-process stand-ins for TF Serving's REST and gRPC front ends that call the
loaded SavedModel (the real model server cannot be installed here).
"""

import base64
import json
import os
import re
import subprocess
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import keras
import numpy as np
import pytest
import tensorflow as tf

from comdefend_tf import ComDefend, get_config
from comdefend_tf.serving import client
from comdefend_tf.serving.export import export_savedmodel
from tests.conftest import REPO_ROOT, subprocess_env

IMAGE_SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("client_exports")
    purifier = ComDefend(get_config("tiny", input_channels=1), seed=21)
    classifier = keras.Sequential([keras.Input(IMAGE_SHAPE), keras.layers.Flatten(),
                                   keras.layers.Dense(3)])
    version_dir = export_savedmodel(purifier, str(base), classifier=classifier)
    return tf.saved_model.load(version_dir), purifier, classifier


def _images(count=2, seed=0):
    return np.random.RandomState(seed).rand(count, *IMAGE_SHAPE).astype(np.float32)


def _pngs(count=2, seed=0):
    pixels = np.round(_images(count, seed) * 255).astype(np.uint8)
    return [tf.io.encode_png(image).numpy() for image in pixels]


def _input_dtypes(signature):
    return {name: (object if spec.dtype == tf.string else spec.dtype.as_numpy_dtype)
            for name, spec in signature.structured_input_signature[1].items()}


def _call(loaded, signature_name, arrays):
    signature = loaded.signatures[signature_name]
    return {name: value.numpy()
            for name, value in signature(**{name: tf.constant(list(array) if array.dtype == object
                                                             else array)
                                            for name, array in arrays.items()}).items()}


# ---------------------------------------------------------------------- requests, offline
@pytest.mark.parametrize("row_format", [False, True])
@pytest.mark.parametrize("signature_name", ["purify", "classify", "serving_default"])
def test_rest_float_requests_are_accepted(served, signature_name, row_format):
    loaded, purifier, classifier = served
    images = _images()
    body = json.loads(json.dumps(client.build_rest_request(signature_name, images, row_format)))
    assert body["signature_name"] == signature_name
    assert ("instances" in body) == row_format
    tensors = client.rest_request_to_tensors(body, _input_dtypes(loaded.signatures[signature_name]))
    np.testing.assert_allclose(tensors["images"], images, rtol=1e-7)
    outputs = _call(loaded, signature_name, tensors)
    if signature_name == "purify":
        np.testing.assert_allclose(outputs["purified"], np.asarray(purifier(images)), atol=1e-5)
    else:
        expected = np.asarray(classifier(purifier(images))).argmax(axis=1)
        np.testing.assert_array_equal(outputs["class_ids"], expected)


@pytest.mark.parametrize("row_format", [False, True])
def test_rest_bytes_requests_carry_b64_and_are_accepted(served, row_format):
    loaded = served[0]
    pngs = _pngs()
    body = client.build_rest_request("purify_bytes", pngs, row_format)
    column = body["instances"] if row_format else body["inputs"]["image_bytes"]
    assert base64.b64decode(column[1]["b64"]) == pngs[1]
    tensors = client.rest_request_to_tensors(json.loads(json.dumps(body)),
                                             _input_dtypes(loaded.signatures["purify_bytes"]))
    assert list(tensors["image_bytes"]) == pngs
    outputs = _call(loaded, "purify_bytes", tensors)
    assert [tf.io.decode_png(png).shape for png in outputs["purified_png_bytes"]] == [
        IMAGE_SHAPE, IMAGE_SHAPE]


@pytest.mark.parametrize("signature_name", ["purify", "purify_bytes", "classify"])
def test_grpc_requests_are_accepted(served, signature_name):
    from tensorflow_serving.apis import predict_pb2

    loaded = served[0]
    values = _pngs() if signature_name == "purify_bytes" else _images()
    request = client.build_grpc_request("comdefend", signature_name, values, version=3)
    wire = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert (wire.model_spec.name, wire.model_spec.signature_name,
            wire.model_spec.version.value) == ("comdefend", signature_name, 3)
    tensors = client.grpc_request_to_tensors(wire)
    outputs = _call(loaded, signature_name, tensors)
    direct = _call(loaded, signature_name,
                   {client.input_name_for(signature_name): np.asarray(values, dtype=object)
                    if signature_name == "purify_bytes" else values})
    for name in outputs:
        np.testing.assert_array_equal(outputs[name], direct[name])


def test_requests_refuse_malformed_values():
    with pytest.raises(ValueError, match="batch, height, width, channels"):
        client.build_rest_request("purify", np.zeros((8, 8, 1)))
    with pytest.raises(ValueError, match="list of encoded images"):
        client.build_grpc_request("comdefend", "purify_bytes", b"\x89PNG")
    assert client.rest_predict_url("localhost:8501", "comdefend") == (
        "http://localhost:8501/v1/models/comdefend:predict")
    assert client.rest_predict_url("https://host/", "m", 2) == (
        "https://host/v1/models/m/versions/2:predict")


def test_rest_responses_are_parsed():
    png = b"\x89PNG fake"
    columnar = {"outputs": {"class_ids": [2, 0], "probabilities": [[0.1, 0.9], [0.8, 0.2]],
                            "purified_png_bytes": [{"b64": base64.b64encode(png).decode()}]}}
    parsed = client.parse_rest_response(columnar)
    np.testing.assert_array_equal(parsed["class_ids"], [2, 0])
    assert parsed["probabilities"].shape == (2, 2) and parsed["purified_png_bytes"][0] == png
    rows = {"predictions": [{"class_ids": 1, "probabilities": [0.3, 0.7]},
                            {"class_ids": 0, "probabilities": [0.6, 0.4]}]}
    np.testing.assert_array_equal(client.parse_rest_response(rows)["class_ids"], [1, 0])
    with pytest.raises(RuntimeError, match="rank-4"):
        client.parse_rest_response({"error": "images must be a rank-4 tensor"})


# ------------------------------------------------- send paths against in-process stand-ins
def _json_outputs(outputs):
    encoded = {}
    for name, value in outputs.items():
        if value.dtype == object:  # TF Serving b64-encodes string outputs named *_bytes
            encoded[name] = [{"b64": base64.b64encode(item).decode()} for item in value]
        else:
            encoded[name] = value.tolist()
    return encoded


@pytest.fixture(scope="module")
def rest_server(served):
    loaded = served[0]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            name = body.get("signature_name", "serving_default")
            try:
                tensors = client.rest_request_to_tensors(
                    body, _input_dtypes(loaded.signatures[name]))
                outputs = _call(loaded, name, tensors)
                # A misbehaving server, chosen by model name: one result too few or too many.
                if "/models/drop_one" in self.path:
                    outputs = {key: value[:-1] for key, value in outputs.items()}
                elif "/models/add_one" in self.path:
                    outputs = {key: np.concatenate([value, value[:1]])
                               for key, value in outputs.items()}
                reply, status = {"outputs": _json_outputs(outputs)}, 200
            except tf.errors.InvalidArgumentError as error:
                reply, status = {"error": error.message}, 400
            payload = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_rest_predict_round_trip(served, rest_server):
    loaded, purifier, classifier = served
    images = _images(3, seed=4)
    outputs = client.predict(rest_server, "comdefend", images, "classify", "rest")
    expected = np.asarray(classifier(purifier(images))).argmax(axis=1)
    np.testing.assert_array_equal(outputs["class_ids"], expected)
    pngs = client.predict(rest_server, "comdefend", _pngs(), "purify_bytes", "rest")
    assert tf.io.decode_png(pngs["purified_png_bytes"][0]).shape == IMAGE_SHAPE
    with pytest.raises(RuntimeError, match="values in \\[0, 1\\]"):
        client.predict(rest_server, "comdefend", images * 3, "purify", "rest")


def test_grpc_predict_round_trip(served):
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    loaded, purifier, _ = served

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            name = request.model_spec.signature_name or "serving_default"
            try:
                outputs = _call(loaded, name, client.grpc_request_to_tensors(request))
            except tf.errors.InvalidArgumentError as error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error.message)
            response = predict_pb2.PredictResponse()
            for key, value in outputs.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(
                    list(value) if value.dtype == object else value))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        images = _images(seed=5)
        outputs = client.predict(f"127.0.0.1:{port}", "comdefend", images, "purify", "grpc")
        np.testing.assert_allclose(outputs["purified"], np.asarray(purifier(images)), atol=1e-5)
        assert outputs["code_bits"].dtype == np.uint8
        with pytest.raises(grpc.RpcError) as caught:  # the client itself refuses rank 3
            client.send_grpc(f"127.0.0.1:{port}", _rank3_request())
        assert "rank-4" in caught.value.details()
    finally:
        server.stop(0)


def _rank3_request():
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "comdefend"
    request.model_spec.signature_name = "purify"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(_images(1)[0]))
    return request


def test_cli_sends_files_and_writes_purified_pngs(rest_server, tmp_path):
    paths = []
    for index, png in enumerate(_pngs(2, seed=6)):
        path = tmp_path / f"image{index}.png"
        path.write_bytes(png)
        paths.append(str(path))
    output_dir = tmp_path / "purified"
    result = subprocess.run(
        [sys.executable, "-m", "export.serving_client", f"--server={rest_server}",
         "--protocol=rest", "--signature=purify_bytes", f"--images={','.join(paths)}",
         f"--output_dir={output_dir}"],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote 2 purified image(s)" in result.stdout
    for name in ("image0.png", "image1.png"):
        assert tf.io.decode_png((output_dir / name).read_bytes()).shape == IMAGE_SHAPE


# ---------------------------------------------------------- refusals: counts and overwrites
@pytest.mark.parametrize("model_name, got", [("drop_one", "1 result(s)"),
                                             ("add_one", "3 result(s)")])
def test_a_response_with_another_count_than_sent_is_an_error(rest_server, model_name, got):
    with pytest.raises(client.ResponseMismatchError,
                       match=re.escape(f"returned {got} in output 'purified_png_bytes' for 2")):
        client.predict(rest_server, model_name, _pngs(), "purify_bytes", "rest")
    with pytest.raises(client.ResponseMismatchError, match="for 2 image"):
        client.predict(rest_server, model_name, _images(), "classify", "rest")


def test_check_output_counts():
    client.check_output_counts({"a": np.zeros((3, 2)), "b": np.zeros(3)}, 3)
    for outputs in ({}, {"a": np.zeros((2, 2))}, {"a": np.zeros(3), "b": np.float32(1)}):
        with pytest.raises(client.ResponseMismatchError):
            client.check_output_counts(outputs, 3)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "export.serving_client", *args], cwd=REPO_ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=240)


def _write_inputs(folder, count=2):
    folder.mkdir(exist_ok=True)
    paths = []
    for index, png in enumerate(_pngs(count, seed=8)):
        path = folder / f"image{index}.png"
        path.write_bytes(png)
        paths.append(str(path))
    return paths


def test_cli_fails_loudly_when_the_server_drops_an_output(rest_server, tmp_path):
    paths = _write_inputs(tmp_path / "inputs")
    output_dir = tmp_path / "purified"
    result = _run_cli(f"--server={rest_server}", "--model_name=drop_one",
                      "--signature=purify_bytes", f"--images={','.join(paths)}",
                      f"--output_dir={output_dir}")
    assert result.returncode == 1
    assert "returned 1 result(s) in output 'purified_png_bytes' for 2 image(s)" in result.stderr
    assert not output_dir.exists() or not list(output_dir.iterdir())  # nothing half-written


def test_cli_never_writes_into_an_input_folder_even_with_overwrite(rest_server, tmp_path):
    paths = _write_inputs(tmp_path / "inputs")
    before = [open(path, "rb").read() for path in paths]
    result = _run_cli(f"--server={rest_server}", "--signature=purify_bytes",
                      f"--images={','.join(paths)}", f"--output_dir={tmp_path / 'inputs'}",
                      "--overwrite")
    assert result.returncode == 1
    assert "is the folder of input" in result.stderr
    assert [open(path, "rb").read() for path in paths] == before


def test_an_input_folder_is_refused_however_it_is_spelled(tmp_path):
    paths = _write_inputs(tmp_path / "inputs")
    (tmp_path / "other").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "inputs")
    for output_dir in (tmp_path / "inputs", f"{tmp_path}/other/../inputs/", tmp_path / "link",
                       os.path.relpath(tmp_path / "inputs")):
        with pytest.raises(ValueError, match="is the folder of input"):
            client.output_paths_for(paths, str(output_dir), overwrite=True)


def test_output_paths_never_resolve_to_an_input(tmp_path):
    inputs = _write_inputs(tmp_path / "inputs", 1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "image0.png").symlink_to(inputs[0])  # the output name points at the input
    with pytest.raises(ValueError, match="resolves to input"):
        client.output_paths_for(inputs, str(out), overwrite=True)
    elsewhere = tmp_path / "elsewhere"
    assert client.output_paths_for(inputs, str(elsewhere)) == [str(elsewhere / "image0.png")]
    (elsewhere).mkdir()
    (elsewhere / "image0.png").write_bytes(b"old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        client.output_paths_for(inputs, str(elsewhere))
    assert client.output_paths_for(inputs, str(elsewhere), overwrite=True)
