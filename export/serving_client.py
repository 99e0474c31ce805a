r"""Sends images to a TF Serving endpoint that serves a ComDefend export (REST or gRPC).

    python -m export.serving_client --server=localhost:8501 --protocol=rest \
        --model_name=comdefend --signature=purify_bytes --images=a.png,b.jpg --output_dir=out

Signatures (see docs/serving.md): ``purify_bytes`` sends the files' own PNG/JPEG bytes (any
sizes); ``purify``, ``classify`` and ``serving_default`` send float32 pixels in [0, 1], so all
images of one call must have the same size. Purified images are written to ``--output_dir`` as
``NAME.png`` (never over an existing file unless ``--overwrite``, and never into an input's own
folder or over an input, even with ``--overwrite``); class ids and the top probability are
printed for ``classify``. A response with fewer or more results than images sent is an error
(exit 1, nothing written): results are never paired with the wrong inputs.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from comdefend_tf.cli import exit_codes

FLAGS = flags.FLAGS
flags.DEFINE_string("server", None, "host:port of the model server (REST: "
                    "--rest_api_port, usually 8501; gRPC: --port, usually 8500). Default: "
                    "localhost with the protocol's usual port.")
flags.DEFINE_enum("protocol", "rest", ["rest", "grpc"], "REST (JSON over HTTP) or gRPC "
                  "(PredictRequest).")
flags.DEFINE_string("model_name", "comdefend", "The server's --model_name.")
flags.DEFINE_integer("model_version", None, "A specific version (default: the server's "
                     "latest).", lower_bound=1)
flags.DEFINE_string("signature", "serving_default", "Signature to call: purify, purify_bytes, "
                    "classify or serving_default.")
flags.DEFINE_list("images", None, "Image files (PNG or JPEG), comma-separated.")
flags.DEFINE_integer("channels", None, "Channels to read float images with (1 or 3); default: "
                     "grey images stay grey, others RGB. Must match the export.")
flags.DEFINE_string("output_dir", None, "Folder for purified PNGs (purify, purify_bytes).")
flags.DEFINE_bool("overwrite", False, "Replace existing files in --output_dir.")
flags.DEFINE_float("timeout_s", 60.0, "Request timeout in seconds.", lower_bound=0.0)
flags.mark_flags_as_required(["images"])


def _request_values(signature: str, paths):
    from comdefend_tf.serving import client
    from comdefend_tf.io import images as image_io

    if client.input_name_for(signature) == "image_bytes":
        values = []
        for path in paths:
            with open(path, "rb") as handle:
                values.append(handle.read())
        return values
    images = [image_io.read_image(path, FLAGS.channels) for path in paths]
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        raise ValueError(f"signature {signature!r} sends one float tensor, so all images must "
                         f"have the same shape; got {sorted(shapes)} (use purify_bytes for "
                         "mixed sizes)")
    return np.stack(images)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from comdefend_tf import optional
    from comdefend_tf.io import images as image_io
    from comdefend_tf.io.atomic import write_bytes_atomic
    from comdefend_tf.serving import client

    server = FLAGS.server or (f"localhost:{client.DEFAULT_REST_PORT}" if FLAGS.protocol == "rest"
                              else f"localhost:{client.DEFAULT_GRPC_PORT}")
    try:
        output_paths = (client.output_paths_for(FLAGS.images, FLAGS.output_dir, FLAGS.overwrite)
                        if FLAGS.output_dir else None)
        values = _request_values(FLAGS.signature, FLAGS.images)
        outputs = client.predict(server, FLAGS.model_name, values, FLAGS.signature,
                                 FLAGS.protocol, FLAGS.model_version, FLAGS.timeout_s)
    except (OSError, ValueError, RuntimeError, optional.MissingExtra) as error:
        print(f"serving_client: {error}", file=sys.stderr)
        return exit_codes.COULD_NOT_START
    except Exception as error:  # grpc.RpcError and requests errors carry the server's reason
        print(f"serving_client: request failed: {error}", file=sys.stderr)
        return exit_codes.COULD_NOT_START

    if "class_ids" in outputs:
        probabilities = outputs.get("probabilities")
        for index, path in enumerate(FLAGS.images):
            line = f"{path}: class {int(outputs['class_ids'][index])}"
            if probabilities is not None:
                line += f" (probability {float(np.max(probabilities[index])):.3f})"
            print(line)
    purified = outputs.get("purified_png_bytes", outputs.get("purified"))
    if purified is not None and output_paths:
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        for item, path in zip(purified, output_paths):
            if isinstance(item, (bytes, np.bytes_)):
                write_bytes_atomic(path, bytes(item))
            else:
                image_io.write_png(path, np.asarray(item))
        print(f"wrote {len(output_paths)} purified image(s) to {FLAGS.output_dir}")
    elif purified is not None:
        print(f"received {len(purified)} purified image(s); pass --output_dir to save them")
    return exit_codes.OK


def run():
    """Console-script entry point."""
    app.run(main)


if __name__ == "__main__":
    run()
