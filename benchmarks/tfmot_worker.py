"""TF-MOT's tensor_encoding uniform quantizer, driven over a pipe so that a fastfed benchmark times it
side by side with fastfed's encoder in one run.

Runs under an interpreter that has tensorflow_model_optimization (TFF's compression tutorial:
``te.encoders.uniform_quantization(bits=8)``, stochastic rounding, as a simple encoder inside a
``tf.function``), not fastfed's. Usage: ``python tfmot_worker.py UPDATE.npy``; it loads the array,
traces the encoder, prints ``ready``, then for every line ``encode`` on stdin encodes the array once,
fetches the result to NumPy and prints the encoded size in bytes.
"""

import sys

import numpy as np
import tensorflow as tf
from tensorflow_model_optimization.python.core.internal import tensor_encoding as te


def main() -> None:
    values = tf.constant(np.load(sys.argv[1]))
    encoder = te.encoders.as_simple_encoder(
        te.encoders.uniform_quantization(bits=8), tf.TensorSpec(values.shape, values.dtype)
    )
    state = encoder.initial_state()

    @tf.function
    def encode(x):  # type: ignore[no-untyped-def]
        return encoder.encode(x, state)

    def encoded_bytes() -> int:
        encoded, _ = encode(values)
        return sum(tensor.numpy().nbytes for tensor in tf.nest.flatten(encoded))

    encoded_bytes()  # traces
    print("ready", flush=True)
    for line in sys.stdin:
        if line.strip() == "encode":
            print(encoded_bytes(), flush=True)


if __name__ == "__main__":
    main()
