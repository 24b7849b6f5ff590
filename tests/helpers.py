"""Small checks that several test files share (import as `from helpers import ...`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def brute_force_info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """L = 1/2B sum_i [-log e^{s a_i.b_i}/sum_j e^{s a_i.b_j} - log e^{s a_i.b_i}/sum_j e^{s a_j.b_i}],
    by loops: the formula as written, to check the vectorised InfoNCE against."""
    B = a.shape[0]
    total = 0.0
    for i in range(B):
        pos = scale * (a[i] * b[i]).sum()
        row = torch.stack([scale * (a[i] * b[j]).sum() for j in range(B)])
        col = torch.stack([scale * (a[j] * b[i]).sum() for j in range(B)])
        total = total - (pos - torch.log(torch.exp(row).sum())) - (pos - torch.log(torch.exp(col).sum()))
    return total / (2 * B)


def assert_same_value_and_gradient(
    fast: Callable[[], torch.Tensor], slow: Callable[[], torch.Tensor], inputs: Sequence[torch.Tensor]
) -> None:
    """`fast()` and `slow()` agree in value and in the gradient with respect to every input."""
    f = fast()
    f_grads = torch.autograd.grad(f, inputs)
    s = slow()
    s_grads = torch.autograd.grad(s, inputs)
    torch.testing.assert_close(f, s)
    for fg, sg in zip(f_grads, s_grads, strict=True):
        torch.testing.assert_close(fg, sg)


def descend(
    loss: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], steps: int = 30, lr: float = 0.5
):
    """(first, last) loss over `steps` of plain gradient descent (torch.optim's first step imports
    for seconds): a loss that can be learnt falls."""
    first = loss().item()
    for _ in range(steps):
        grads = torch.autograd.grad(loss(), params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
    return first, loss().item()


def suite_error(folder, text: str) -> str:
    """The one ConfigError message that loading the suite `text` (YAML) must raise."""
    import pytest

    from coalign.evaluate.suites import load_suite
    from coalign.registry import ConfigError

    path = folder / "suite.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    return str(err.value)
