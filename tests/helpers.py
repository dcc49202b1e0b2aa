"""Test helpers shared by the physics, MEL and network tests (import as ``from helpers import ...``).

- :func:`make_sense_problem`: a tiny random SENSE problem (:func:`melrecon.physics.problems.random_sense_problem`
  with test-sized defaults);
- :func:`assert_adjoint`: the dot-product test ``<A x, y> = <x, A^H y>`` for any operator;
- :func:`rand_complex`: complex Gaussian noise from a seeded generator;
- :func:`grads_of_step`: one training step's gradients (chain input first, then parameters);
- :func:`rel_error`, :func:`max_rel_error`: relative errors of lists of tensors;
- :func:`read_csv`, :func:`read_metrics_csv`, :func:`column`: CSV tables and a run's CSV-logger history.
- :func:`one_error_line`, :func:`main_exit`, :func:`train_tiny_run`: the training application's one-line
  errors, its exit status, a finished tiny run.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from melrecon.physics.operators import LinearOperator
from melrecon.physics.problems import SenseProblem, random_sense_problem

# image axes after the batch axis: slab (X, Y, Z), cine (T, X, Y)
TINY_SHAPES = {"slab": (4, 10, 12), "cine": (4, 10, 12)}


def make_sense_problem(
    layout: str = "cine",
    shape: Sequence[int] | None = None,
    coils: int = 3,
    dtype: torch.dtype = torch.complex64,
    seed: int = 0,
    batch: int = 1,
) -> SenseProblem:
    """A random problem of ``layout`` ("slab" or "cine") at a test size (``TINY_SHAPES``)."""
    return random_sense_problem(layout, shape or TINY_SHAPES[layout], coils, dtype, seed=seed, batch=batch)


def rand_complex(shape: Sequence[int], dtype: torch.dtype = torch.complex128, seed: int = 0) -> Tensor:
    """Complex Gaussian noise (drawn in float64, then cast) from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    real = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    imag = torch.randn(tuple(shape), generator=gen, dtype=torch.float64)
    return torch.complex(real, imag).to(dtype)


def assert_adjoint(
    op: LinearOperator, x_shape: Sequence[int], dtype: torch.dtype = torch.complex128, rtol: float = 1e-12, seed: int = 0
) -> None:
    """Assert ``<A x, y> == <x, A^H y>`` (relative to ``|<A x, y>|``) for random x and y."""
    x = rand_complex(x_shape, dtype, seed)
    ax = op(x)
    y = rand_complex(ax.shape, dtype, seed + 1)
    lhs = torch.vdot(ax.flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.adjoint(y).flatten())
    err = float(abs(lhs - rhs) / abs(lhs))
    assert err < rtol, f"<Ax, y> = {complex(lhs)} vs <x, A^H y> = {complex(rhs)}: relative error {err:.3g} >= {rtol:g}"


def grads_of_step(net: nn.Module, problem: SenseProblem) -> tuple[list[Tensor], Tensor]:
    """One step of the loss ``sum |net(problem) - target|^2``: returns ``[dL/dx0, *dL/dparams]``
    (parameters that require grad, in ``net.parameters()`` order) and the detached output."""
    net.zero_grad(set_to_none=True)
    x0 = problem.x0.detach().clone().requires_grad_()
    out = net(x0, problem.kspace, problem.maps, problem.mask)
    (out - problem.target).abs().pow(2).sum().backward()
    params = [p for p in net.parameters() if p.requires_grad]
    return [x0.grad] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params], out.detach()


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([torch.view_as_real(t).flatten() if t.is_complex() else t.flatten() for t in ts])


def rel_error(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """``||a - b|| / ||b||`` over all tensors of the lists together."""
    return float((_flat(a) - _flat(b)).norm() / _flat(b).norm())


def max_rel_error(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """The worst ``||a_i - b_i|| / ||b_i||`` over the pairs of tensors."""
    return max(float((p - q).norm() / q.norm()) for p, q in zip(a, b))


def model_config(name: str):
    """``conf/model/<name>.yaml`` as Hydra composes it (its defaults list resolved), at the
    family's paper sizes (no ``debug`` sizes), as a DictConfig ready for ``instantiate``."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={name}", "~debug"])
    from omegaconf import OmegaConf

    model = cfg.model
    OmegaConf.set_struct(model, False)  # tests merge their own settings onto it
    return model


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a CSV file with a header, as dicts of strings."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_metrics_csv(folder: str | Path) -> list[dict[str, str]]:
    """The rows of the one Lightning CSV-logger ``metrics.csv`` under ``folder`` (a run keeps one history)."""
    files = list(Path(folder).rglob("metrics.csv"))
    assert len(files) == 1, f"one metrics.csv expected under {folder}, found {files}"
    return read_csv(files[0])


def column(rows: list[dict[str, str]], key: str) -> list[float]:
    """The values of ``key`` in the rows that logged it, in order."""
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


# ---------------------------------------------------------------------- the training application
def one_error_line(err: str, expect: str, prefix: str = "melrecon: error:") -> str:
    """The single ``prefix`` line of ``err``, which must contain ``expect``; no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith(prefix)]
    assert len(lines) == 1 and expect in lines[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def main_exit(cfg, capsys) -> tuple[int, str]:
    """Run ``melrecon.lit.app.main(cfg)``; return (exit status, stderr)."""
    from melrecon.lit import app

    try:
        app.main(cfg)
        code = 0
    except SystemExit as e:
        code = int(e.code)
    return code, capsys.readouterr().err


def train_tiny_run(run_dir: Path, conf_dir: Path, data_dir: Path, *overrides: str) -> Path:
    """Train a finished one-epoch ``debug=tiny`` run into ``run_dir`` (W&B off) and save its
    ``.hydra/config.yaml`` as Hydra does (what resume and reconstruct read); returns ``run_dir``."""
    import pytest
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from melrecon.lit import app

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MELRECON_DATA_DIR", str(data_dir))
        mp.setenv("WANDB_MODE", "disabled")
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["debug=tiny", *overrides])
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
        app.run(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = "${hydra:runtime.output_dir}"
        (run_dir / ".hydra").mkdir()
        OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_dir
