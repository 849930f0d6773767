"""Last-layer Laplace on a trained ensemble, member by member: a mixture of Laplace posteriors, on ``laplace-torch``.

For each member ``ensemble.member(i)`` (a standalone copy), ``laplace-torch`` fits a last-layer Laplace
approximation (``Laplace(member, "classification", subset_of_weights="last_layer",
hessian_structure="kron")`` by default) on the training data and tunes its prior precision on the
validation data (``optimize_prior_precision(method="gridsearch", val_loader=...)``: the validation NLL
of the GLM predictive). The result, :class:`LaplaceEnsemble`, is an
:class:`~lightning_ensembles.Ensemble` whose outputs are **log-probabilities**, usable as logits
everywhere (``softmax(log p) = p``):

- ``num_samples=0`` (default): ``(M, B, C)``, member ``i``'s GLM predictive with the probit link;
  the ensemble prediction (mean over members) is the Laplace mixture;
- ``num_samples=S``: ``(M * S, B, C)``, S GLM posterior samples of every member, member-major (member
  0's samples first), drawn from a generator seeded with ``seed`` so that a forward is reproducible and
  ``member(i)`` matches output ``i``.

With one member it is exactly laplace-torch's own single-model Laplace. Laplace is optional
(``pip install lightning-ensembles[laplace]``); it runs on the device where it was fitted.

The fitted state (Kronecker factors, posterior mean, prior precision, ...) is available as plain
tensors and strings by :meth:`LaplaceEnsemble.laplace_state` and restored by
:func:`load_laplace_ensemble`, so it fits in a ``weights_only`` checkpoint.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_choice
from ..ensembles.base import Ensemble

__all__ = ["LaplaceEnsemble", "fit_laplace", "load_laplace_ensemble"]


def _laplace() -> Any:
    try:
        from laplace import Laplace
    except ImportError as err:  # pragma: no cover - the extra is installed in CI
        raise ImportError(
            "last-layer Laplace needs laplace-torch: `pip install lightning-ensembles[laplace]` "
            "(or `pip install laplace-torch`)."
        ) from err
    return Laplace


def _as_linear(model: nn.Module) -> nn.Module:
    """Replace one-group grouped linears (a Packed-Ensembles member's layers) by the ``nn.Linear`` they equal.

    laplace-torch's last-layer Laplace needs an ``nn.Linear`` last layer.
    """
    from ..ensembles.packed import GroupedLinear
    from ..ensembles.surgery import set_submodule

    for path, mod in list(model.named_modules()):
        if isinstance(mod, GroupedLinear) and mod.weight.shape[0] == 1:
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin = lin.to(device=mod.weight.device, dtype=mod.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(mod.weight[0])
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            if path:
                set_submodule(model, path, lin)
            else:
                model = lin
    return model


def _members(ensemble: nn.Module) -> list[nn.Module]:
    if isinstance(ensemble, Ensemble):
        return [_as_linear(ensemble.member(i)) for i in range(ensemble.num_members)]
    return [copy.deepcopy(ensemble)]  # a single model is an ensemble of one


class _Member(nn.Module):
    """Member ``index`` of a :class:`LaplaceEnsemble` alone (sample ``sample`` of its posterior, or its predictive)."""

    def __init__(self, owner: LaplaceEnsemble, member: int, sample: int | None) -> None:
        super().__init__()
        self.owner, self.index, self.sample = [owner], member, sample  # a list: not registered as a submodule

    def forward(self, x: Tensor) -> Tensor:
        out = self.owner[0]._member_log_probs(self.index, x)
        return out if self.sample is None else out[self.sample]


class LaplaceEnsemble(Ensemble):
    """A mixture of per-member last-layer Laplace posteriors; ``forward(x)`` gives member log-probabilities.

    Build it with :func:`fit_laplace`. See the module docstring for the output contract.

    Args:
        models: the member copies the Laplace posteriors were fitted on.
        laplaces: one fitted ``laplace-torch`` Laplace object per member.
        num_samples: 0 for each member's GLM predictive, ``S`` for S posterior samples per member.
        link_approx: ``laplace-torch``'s link approximation of the predictive (``"probit"``).
        seed: seed of the posterior samples.
        config: the settings of :func:`fit_laplace`, kept for saving and loading.
    """

    def __init__(
        self,
        models: list[nn.Module],
        laplaces: list[Any],
        num_samples: int = 0,
        link_approx: str = "probit",
        seed: int = 0,
        config: dict[str, Any] | None = None,
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"`num_samples` must be >= 0 (0: the probit predictive), got {num_samples}.")
        super().__init__(len(models) * max(num_samples, 1))
        self.models = nn.ModuleList(models)
        self.laplaces = laplaces
        self.num_samples = num_samples
        self.link_approx = link_approx
        self.seed = seed
        self.config = dict(config or {})

    @property
    def num_models(self) -> int:
        return len(self.models)

    @property
    def prior_precisions(self) -> list[float]:
        """The prior precision fitted for each member (on validation data)."""
        return [float(torch.as_tensor(la.prior_precision).mean()) for la in self.laplaces]

    def _member_log_probs(self, i: int, x: Tensor) -> Tensor:
        la = self.laplaces[i]
        with torch.inference_mode(False), torch.no_grad():
            x = x.clone() if x.is_inference() else x
            if self.num_samples:
                gen = torch.Generator(device=x.device).manual_seed(self.seed + i)
                probs = la.predictive_samples(x, pred_type="glm", n_samples=self.num_samples, generator=gen)
            else:
                probs = la(x, pred_type="glm", link_approx=self.link_approx)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    def forward(self, x: Tensor) -> Tensor:
        outs = [self._member_log_probs(i, x) for i in range(self.num_models)]
        if self.num_samples:
            return torch.cat(outs, dim=0)  # (M * S, B, C), member-major
        return torch.stack(outs, dim=0)

    def member(self, index: int) -> nn.Module:
        index = self._check_index(index)
        if self.num_samples:
            return _Member(self, index // self.num_samples, index % self.num_samples)
        return _Member(self, index, None)

    # ------------------------------------------------------------------ state as plain data
    def laplace_state(self) -> list[dict[str, Any]]:
        """Every member's laplace-torch state as tensors, numbers and strings (``weights_only``-loadable)."""
        states = []
        for la in self.laplaces:
            state = la.state_dict()
            # laplace-torch keeps a training batch only to find the last layer again: one sample does that
            data = state.get("data")
            if isinstance(data, (tuple, list)) and data and isinstance(data[0], Tensor):
                state["data"] = [d[:1] if isinstance(d, Tensor) else d for d in data]
            states.append(_plain(state))
        return states


def _plain(value: Any) -> Any:
    from laplace.utils.matrix import Kron

    if isinstance(value, Kron):
        return {"__kron__": [list(f) if isinstance(f, (tuple, list)) else f for f in value.kfacs]}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} of the Laplace state as plain data.")


def _restore(value: Any, device: torch.device) -> Any:
    from laplace.utils.matrix import Kron

    if isinstance(value, dict) and "__kron__" in value:
        # Kron's annotation says tuples, but laplace stores each layer's factors as a list (as saved here).
        factors: list[Any] = [
            [t.to(device) for t in f] if isinstance(f, list) else f.to(device) for f in value["__kron__"]
        ]
        return Kron(factors)
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _restore(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore(v, device) for v in value]
    return value


def _new_laplace(model: nn.Module, config: dict[str, Any]) -> Any:
    return _laplace()(
        model,
        config["likelihood"],
        subset_of_weights="last_layer",
        hessian_structure=config["hessian_structure"],
        last_layer_name=config.get("last_layer_name"),
    )


def fit_laplace(
    ensemble: nn.Module,
    train_loader: Iterable,
    val_loader: Iterable | None = None,
    hessian_structure: str = "kron",
    prior_method: str = "gridsearch",
    num_samples: int = 0,
    link_approx: str = "probit",
    last_layer_name: str | None = None,
    grid_size: int = 21,
    log_prior_prec_min: float = -4.0,
    log_prior_prec_max: float = 4.0,
    seed: int = 0,
) -> LaplaceEnsemble:
    """Fit a last-layer Laplace approximation to every member of ``ensemble`` (or to a single model).

    ``train_loader`` yields ``(x, y)`` batches and has a ``dataset`` (laplace-torch reads its size);
    ``val_loader`` tunes each member's prior precision by ``prior_method="gridsearch"`` (validation NLL
    over ``grid_size`` values between ``10**log_prior_prec_min`` and ``10**log_prior_prec_max``); without
    it, ``prior_method="marglik"`` maximises the marginal likelihood on the training data instead.
    The members are copies: the ensemble itself is not changed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_ensembles import DeepEnsemble
        >>> g = torch.Generator().manual_seed(0)
        >>> x, y = torch.randn(200, 4, generator=g), torch.randint(0, 3, (200,), generator=g)
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=50)
        >>> ens = DeepEnsemble(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), num_members=2)
        >>> la = fit_laplace(ens, loader, loader)
        >>> la(x[:5]).shape, la(x[:5]).exp().sum(-1).allclose(torch.ones(2, 5))
        (torch.Size([2, 5, 3]), True)
    """
    check_choice("prior_method", prior_method, ("gridsearch", "marglik"), hint="'gridsearch' tunes on `val_loader`.")
    if prior_method == "gridsearch" and val_loader is None:
        raise ValueError(
            "prior_method='gridsearch' tunes the prior precision on validation data: pass `val_loader`, or use "
            "prior_method='marglik' (marginal likelihood on the training data)."
        )
    config = {
        "likelihood": "classification",
        "hessian_structure": hessian_structure,
        "last_layer_name": last_layer_name,
    }
    models, laplaces = [], []
    for i, model in enumerate(_members(ensemble)):
        model.eval()
        la = _new_laplace(model, config)
        try:
            la.fit(train_loader)
            with warnings.catch_warnings():  # the link used is passed explicitly; laplace-torch's reminder is noise
                warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")
                _tune(la, prior_method, val_loader, link_approx, grid_size, log_prior_prec_min, log_prior_prec_max)
        except (ValueError, RuntimeError) as err:
            raise ValueError(
                f"laplace-torch could not fit a last-layer Laplace to member {i} of {type(ensemble).__name__}: {err}. "
                "Last-layer Laplace needs every member (`ensemble.member(i)`) to end in an nn.Linear mapping its "
                "features to its own outputs; members that share a widened output layer (MIMO) do not. Give "
                "`last_layer_name=` if the last layer is not found, or use another ensemble method."
            ) from err
        models.append(model)
        laplaces.append(la)
    return LaplaceEnsemble(models, laplaces, num_samples, link_approx, seed, config)


def _tune(la: Any, prior_method: str, val_loader: Any, link_approx: str, grid_size: int, lo: float, hi: float) -> None:
    if prior_method == "gridsearch":
        la.optimize_prior_precision(
            pred_type="glm",
            method="gridsearch",
            val_loader=val_loader,
            link_approx=link_approx if link_approx != "mc" else "probit",
            grid_size=grid_size,
            log_prior_prec_min=lo,
            log_prior_prec_max=hi,
        )
    else:
        la.optimize_prior_precision(pred_type="glm", method="marglik")


def load_laplace_ensemble(
    ensemble: nn.Module,
    state: list[dict[str, Any]],
    config: dict[str, Any],
    num_samples: int = 0,
    link_approx: str = "probit",
    seed: int = 0,
) -> LaplaceEnsemble:
    """Rebuild a :class:`LaplaceEnsemble` from the members of ``ensemble`` and :meth:`LaplaceEnsemble.laplace_state`."""
    members = _members(ensemble)
    if len(members) != len(state):
        raise ValueError(
            f"the saved Laplace state has {len(state)} members, the ensemble {len(members)}: load it into the "
            "ensemble it was fitted on."
        )
    laplaces = []
    for model, s in zip(members, state):
        model.eval()
        device = next(model.parameters()).device
        la = _new_laplace(model, config)
        la.load_state_dict(_restore(s, device))
        laplaces.append(la)
    return LaplaceEnsemble(members, laplaces, num_samples, link_approx, seed, config)
