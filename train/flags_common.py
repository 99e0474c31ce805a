"""Flags shared by the binaries that read a dataset (one definition, one help text)."""

import sys

from absl import flags

from comdefend_tf.io import datasets as data_lib
from comdefend_tf import optional


def define_data_flags(default_dataset: str = "mnist5k") -> None:
    """Defines --dataset, --image_size, --color_mode, --data_dir and --manual_dir."""
    flags.DEFINE_string(
        "dataset", default_dataset,
        f"Image source: one of {', '.join(data_lib.source_names())}. The embedded sets need no "
        "download; they and the tensorflow-datasets names need the [data] extra (pip install "
        "'comdefend-tf[data]'). folder:PATH reads PATH/<class>/<image>.png|jpg.")
    flags.DEFINE_list("image_size", None,
                      "Resize every image to HEIGHT,WIDTH pixels (default: the images' own size).")
    flags.DEFINE_enum("color_mode", None, sorted(data_lib.COLOR_MODES),
                      "Convert images to this many channels (default: the source's own).")
    flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
    flags.DEFINE_string("manual_dir", None,
                        "tensorflow-datasets manual download directory (imagenet2012).")


def load_data_from_flags(split_seed: int = 0) -> data_lib.ImageData:
    """Opens the dataset the data flags name. Raises ``data.DataError`` on bad data; exits with
    status 1 and one line naming the pip extra to install when the source needs one."""
    values = flags.FLAGS
    image_size = None
    if values.image_size:
        try:
            image_size = tuple(int(size) for size in values.image_size)
        except ValueError as error:
            raise flags.ValidationError(
                f"--image_size must be HEIGHT,WIDTH integers, got {values.image_size}") from error
    try:
        return data_lib.load_dataset(values.dataset, image_size=image_size,
                                     color_mode=values.color_mode, split_seed=split_seed,
                                     data_dir=values.data_dir, manual_dir=values.manual_dir)
    except optional.MissingExtra as error:
        sys.exit(f"error: {error}")
