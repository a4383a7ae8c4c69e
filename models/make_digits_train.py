"""Write models/digits_train.npz: the 1347 training rows the zoo's digits models were trained on.

The fine-tuning example (examples/finetune_digits.py) trains on them without scikit-learn. The
split is the zoo's own (models/zoo/digits.py, `load_split`: 75/25 stratified, random_state 0),
so the held-out rows stay those of digits_test.npz. Pixels are stored as their original uint8
values 0..16 (x: [1347, 64]) to keep the file small; divide by 16 as the zoo did. Needs
scikit-learn (`pip install -e ".[zoo]"`): python models/make_digits_train.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def digits_train_arrays() -> dict[str, np.ndarray]:
    """x (uint8 pixels 0..16, [1347, 64]) and y (int64 labels) of the zoo's training split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = digits.data.astype(np.uint8)  # integer counts 0..16 stored as float by sklearn
    assert np.array_equal(pixels, digits.data), "digits pixels are not whole numbers 0..16"
    labels = digits.target.astype(np.int64)
    # The same call as models/zoo/digits.py: the same rows go to training and test.
    x_train, _, y_train, _ = train_test_split(pixels, labels, test_size=0.25, random_state=0, stratify=labels)
    return {"x": x_train, "y": y_train}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "digits_train.npz")
    args = parser.parse_args()
    np.savez_compressed(args.out, **digits_train_arrays())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
