"""flows/config.py: torch-free, validated hyperparameters; one-line errors naming the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from calodistill.flows.config import (
    ACTIVATION_NAMES,
    DistillConfig,
    FlowConfig,
    PreprocessingConfig,
    TrainConfig,
    flow1_config,
)
from calodistill.flows.errors import FlowsError

REPO = Path(__file__).resolve().parents[2]


def test_importing_the_configs_does_not_import_torch() -> None:
    code = "import sys, calodistill.flows.config; assert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr


def test_activation_names_are_those_of_the_transforms() -> None:
    from calodistill.flows.transforms import ACTIVATIONS

    assert set(ACTIVATION_NAMES) == set(ACTIVATIONS)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FlowConfig(features=0), "features: must be an integer >= 1, got 0"),
        (lambda: FlowConfig(features=4, hidden_features=0), "hidden_features: must be an integer >= 1, got 0"),
        (lambda: FlowConfig(n_blocks=2.5), "n_blocks: must be an integer >= 1, got 2.5"),
        (lambda: FlowConfig(kind="cubic"), "kind: must be one of spline, affine, got 'cubic'"),
        (lambda: FlowConfig(activation="swish"), "activation: must be one of"),
        (lambda: FlowConfig(dropout=1.0), "dropout: must be a number in [0, 1), got 1.0"),
        (lambda: FlowConfig(tail_bound="14"), "tail_bound: must be a number in (0, inf), got '14'"),
        (lambda: TrainConfig(epochs=0), "epochs: must be an integer >= 1, got 0"),
        (lambda: TrainConfig(lr=0.0), "lr: must be a number in (0, inf), got 0.0"),
        (lambda: TrainConfig(schedule="linear"), "schedule: must be one of onecycle, cosine, step, constant"),
        (lambda: TrainConfig(patience=True), "patience: must be an integer >= 0, got True"),
        (lambda: TrainConfig(grad_clip=-1.0), "grad_clip: must be a number in [0, inf), got -1.0"),
        (lambda: DistillConfig(beta=2.0), "beta: must be a number in [0, 1], got 2.0"),
        (lambda: DistillConfig(fully_guided=1), "fully_guided: must be true or false, got 1"),
        (lambda: DistillConfig(x_pass="forced"), "x_pass: must be one of chain, local, got 'forced'"),
        (lambda: DistillConfig(kl_weight=float("nan")), "kl_weight: must be a number in [0, inf), got nan"),
        (lambda: PreprocessingConfig(alpha=0.5), "alpha: must be a number in (0, 0.5), got 0.5"),
        (lambda: PreprocessingConfig(noise_level=-1e-3), "noise_level: must be a number in [0, inf)"),
    ],
)
def test_invalid_values_fail_in_one_line_naming_the_field(make, message: str) -> None:
    with pytest.raises(FlowsError) as info:
        make()
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_configs_are_frozen() -> None:
    for cfg in (FlowConfig(), TrainConfig(), DistillConfig(), PreprocessingConfig()):
        with pytest.raises(AttributeError):
            cfg.seed = 1  # type: ignore[misc]


def test_resolve_fills_in_the_sizes_of_the_data() -> None:
    teacher = FlowConfig(n_blocks=4, hidden_features=0)  # CaloFlow's teacher: hidden = D
    cfg = teacher.resolve(504, 4)
    assert (cfg.features, cfg.context_features, cfg.hidden_features, cfg.n_blocks) == (504, 4, 504, 4)
    assert FlowConfig(hidden_features=32).resolve(10, 1).hidden_features == 32
    assert cfg.resolve(504, 4) == cfg
    with pytest.raises(FlowsError, match="features: 504 in the config, but the data has 368"):
        cfg.resolve(368, 4)
    with pytest.raises(FlowsError, match="context_features: 4 in the config, but the data has 2"):
        cfg.resolve(504, 2)


def test_a_flow_needs_its_features() -> None:
    from calodistill.flows.models import build_maf

    with pytest.raises(FlowsError, match=r"features: not set \(FlowConfig.resolve"):
        build_maf(FlowConfig())


def test_stored_config_dicts_still_load() -> None:
    # the "config" dict of a flow file written before flows/config.py existed
    stored = {"features": 3, "context_features": 1, "n_blocks": 6, "hidden_features": 64, "n_hidden_layers": 2,
              "kind": "spline", "num_bins": 8, "tail_bound": 14.0, "permutation": "reverse",
              "permutation_seed": 0, "dropout": 0.0, "activation": "relu"}
    assert FlowConfig.from_dict(stored) == flow1_config(3)
    assert FlowConfig.from_dict(stored).to_dict() == stored
