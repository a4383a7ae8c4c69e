"""Training in plain NumPy for the digits models: manual backprop, Adam, softmax
cross-entropy. Convolutions go through im2col so each is one matrix product. Parameters are
dicts keyed by their state-dict names, so export is a lookup."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Params = dict[str, np.ndarray]
LossAndGrads = Callable[[Params, np.ndarray, np.ndarray], tuple[float, Params]]
BN_EPS = 1e-5


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss and its gradient with respect to the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    rows = np.arange(len(labels))
    loss = -np.log(probs[rows, labels] + 1e-12).mean()
    probs[rows, labels] -= 1.0
    return float(loss), probs / len(labels)


class Adam:
    def __init__(self, params: Params, lr: float, beta1=0.9, beta2=0.999, eps=1e-8) -> None:
        self.lr, self.beta1, self.beta2, self.eps, self.t = lr, beta1, beta2, eps, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def step(self, params: Params, grads: Params) -> None:
        self.t += 1
        correction = np.sqrt(1 - self.beta2**self.t) / (1 - self.beta1**self.t)
        for k, g in grads.items():
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * g
            self.v[k] = self.beta2 * self.v[k] + (1 - self.beta2) * g * g
            params[k] -= self.lr * correction * self.m[k] / (np.sqrt(self.v[k]) + self.eps)


def train(
    params: Params,
    loss_and_grads: LossAndGrads,
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
) -> Params:
    """Minibatch Adam; the learning rate decays linearly to 10% so the last epochs settle."""
    optimizer = Adam(params, lr)
    for epoch in range(epochs):
        optimizer.lr = lr * (1.0 - 0.9 * epoch / epochs)
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start : start + batch_size]
            _, grads = loss_and_grads(params, x[batch], y[batch])
            optimizer.step(params, grads)
    return params


# --- MLP ------------------------------------------------------------------------------------


def init_mlp(rng: np.random.Generator, sizes: list[int]) -> Params:
    params = {}
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=False), start=1):
        params[f"fc{i}.weight"] = rng.standard_normal((d_out, d_in)) * np.sqrt(2.0 / d_in)
        params[f"fc{i}.bias"] = np.zeros(d_out)
    return params


def mlp_logits(params: Params, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Linear layers with ReLU between them; also returns each layer's input for backprop."""
    layers = len(params) // 2
    inputs = []
    for i in range(1, layers + 1):
        inputs.append(x)
        x = x @ params[f"fc{i}.weight"].T + params[f"fc{i}.bias"]
        if i < layers:
            x = np.maximum(x, 0.0)
    return x, inputs


def mlp_loss_and_grads(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    logits, inputs = mlp_logits(params, x)
    loss, grad = softmax_cross_entropy(logits, y)
    grads = {}
    for i in range(len(inputs), 0, -1):
        a = inputs[i - 1]
        grads[f"fc{i}.weight"] = grad.T @ a
        grads[f"fc{i}.bias"] = grad.sum(axis=0)
        grad = (grad @ params[f"fc{i}.weight"]) * (a > 0)  # ReLU' of the layer below
    return loss, grads


# --- CNN: conv3x3(same) -> BN -> ReLU, twice, then maxpool 2 and a linear layer -----------


def im2col(x: np.ndarray, k: int = 3) -> np.ndarray:
    """[N, C, H, W] -> [N*H*W, C*k*k] patches for a stride-1 'same' conv; the column order
    (channel, ky, kx) matches a weight reshaped to [C_out, C*k*k]."""
    n, c, h, w = x.shape
    p = k // 2
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    patches = np.stack([padded[:, :, i : i + h, j : j + w] for i in range(k) for j in range(k)], 2)
    return patches.transpose(0, 3, 4, 1, 2).reshape(n * h * w, c * k * k)


def col2im(cols: np.ndarray, shape: tuple[int, ...], k: int = 3) -> np.ndarray:
    """Adjoint of im2col: scatter-add patch gradients back onto the input."""
    n, c, h, w = shape
    p = k // 2
    patches = cols.reshape(n, h, w, c, k, k)
    padded = np.zeros((n, c, h + 2 * p, w + 2 * p))
    for i in range(k):
        for j in range(k):
            padded[:, :, i : i + h, j : j + w] += patches[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return padded[:, :, p : p + h, p : p + w]


def conv_forward(x: np.ndarray, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n, _, h, w = x.shape
    cols = im2col(x, weight.shape[-1])
    out = cols @ weight.reshape(len(weight), -1).T
    return out.reshape(n, h, w, -1).transpose(0, 3, 1, 2), cols


def conv_backward(dout: np.ndarray, cols: np.ndarray, weight: np.ndarray, x_shape):
    dout = dout.transpose(0, 2, 3, 1).reshape(-1, len(weight))
    dweight = (dout.T @ cols).reshape(weight.shape)
    dx = col2im(dout @ weight.reshape(len(weight), -1), x_shape, weight.shape[-1])
    return dx, dweight


def bn_normalize(z: np.ndarray, stats: tuple[np.ndarray, np.ndarray] | None):
    """Per-channel normalization with batch statistics (training) or given ones (eval)."""
    mean, var = stats if stats is not None else (z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3)))
    inv_std = 1.0 / np.sqrt(var + BN_EPS)
    return (z - mean[:, None, None]) * inv_std[:, None, None], inv_std


def bn_affine(params: Params, i: int, zhat: np.ndarray) -> np.ndarray:
    return params[f"bn{i}.weight"][:, None, None] * zhat + params[f"bn{i}.bias"][:, None, None]


def bn_backward(dzhat: np.ndarray, zhat: np.ndarray, inv_std: np.ndarray) -> np.ndarray:
    """Gradient through batch-statistics normalization (mean and variance depend on z)."""
    mean_d = dzhat.mean(axis=(0, 2, 3), keepdims=True)
    mean_dz = (dzhat * zhat).mean(axis=(0, 2, 3), keepdims=True)
    return (dzhat - mean_d - zhat * mean_dz) * inv_std[:, None, None]


def init_cnn(rng: np.random.Generator, channels=(1, 8, 16), classes=10, pooled=16) -> Params:
    params = {}
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=False), start=1):
        params[f"conv{i}.weight"] = rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2 / c_in / 9)
        params[f"bn{i}.weight"] = np.ones(c_out)
        params[f"bn{i}.bias"] = np.zeros(c_out)
    features = channels[-1] * pooled
    params["fc.weight"] = rng.standard_normal((classes, features)) * np.sqrt(1 / features)
    params["fc.bias"] = np.zeros(classes)
    return params


def cnn_forward(params: Params, x: np.ndarray, stats: list | None = None):
    """Logits plus what backprop needs; `stats` (eval mode) replaces batch statistics."""
    caches = []
    for i in (1, 2):
        z, cols = conv_forward(x, params[f"conv{i}.weight"])
        zhat, inv_std = bn_normalize(z, stats[i - 1] if stats else None)
        a = bn_affine(params, i, zhat)
        caches.append((x.shape, cols, zhat, inv_std, a))
        x = np.maximum(a, 0.0)
    n, c, h, w = x.shape
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2)
    pooled = windows.max(axis=(3, 5))
    # First maximum of each 2x2 window gets the gradient (ties only occur at ReLU zeros).
    argmax = windows.transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4).argmax(-1)
    flat = pooled.reshape(n, -1)
    logits = flat @ params["fc.weight"].T + params["fc.bias"]
    return logits, (caches, argmax, flat, x.shape)


def cnn_loss_and_grads(params: Params, x: np.ndarray, y: np.ndarray) -> tuple[float, Params]:
    logits, (caches, argmax, flat, relu_shape) = cnn_forward(params, x)
    loss, grad = softmax_cross_entropy(logits, y)
    grads = {"fc.weight": grad.T @ flat, "fc.bias": grad.sum(axis=0)}
    n, c, h, w = relu_shape
    dpooled = (grad @ params["fc.weight"]).reshape(n, c, h // 2, w // 2)
    dwin = np.zeros((n, c, h // 2, w // 2, 4))
    np.put_along_axis(dwin, argmax[..., None], dpooled[..., None], axis=-1)
    dx = dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(relu_shape)
    for i in (2, 1):
        x_shape, cols, zhat, inv_std, a = caches[i - 1]
        da = dx * (a > 0)
        grads[f"bn{i}.weight"] = (da * zhat).sum(axis=(0, 2, 3))
        grads[f"bn{i}.bias"] = da.sum(axis=(0, 2, 3))
        dz = bn_backward(da * params[f"bn{i}.weight"][:, None, None], zhat, inv_std)
        dx, grads[f"conv{i}.weight"] = conv_backward(dz, cols, params[f"conv{i}.weight"], x_shape)
    return loss, grads


def bn_population_stats(params: Params, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Running statistics for export, measured over the whole training set, each layer
    normalized with the statistics already fixed for the layers below it."""
    stats = []
    for i in (1, 2):
        z, _ = conv_forward(x, params[f"conv{i}.weight"])
        stats.append((z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))))
        x = np.maximum(bn_affine(params, i, bn_normalize(z, stats[-1])[0]), 0.0)
    return stats
