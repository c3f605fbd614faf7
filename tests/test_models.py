"""Tests of the torch building blocks in models/: patch CNN, weights loading, bundle, MIL, pattern statistics."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from safetensors.torch import save_file

from models import (
    BACKBONES,
    DEFAULT_CLASSES,
    AggregatorSpec,
    ArchitectureSpec,
    BundleContract,
    BundleError,
    GatedAttentionMIL,
    MaxPoolMIL,
    MeanPoolMIL,
    PatchClassifier,
    PatternStatistics,
    PatternStatsClassifier,
    TrainingSpec,
    WeightsError,
    build_aggregator,
    bundle_sha256,
    load_backbone_weights,
    load_bundle,
    pad_bags,
    read_contract,
    save_bundle,
    to_tensor_batch,
)
from pipeline import DEMO_MODEL_LABEL
from pipeline.core.config import StrictModel, config_hash
from pipeline.core.errors import ConfigError, DataError, MPPError
from pipeline.tiles.tiling import TilingConfig
from pipeline.tiles.tissue import TissueConfig

SMALL = 64  # tile edge for tests: every backbone accepts 64 px


def _tiles(b: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, SMALL, SMALL, generator=g)


# --------------------------------------------------------------------------- patch classifier


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_gives_logits_and_embeddings(name: str) -> None:
    torch.manual_seed(0)
    model = PatchClassifier(name, dropout=0.1).eval()
    x = _tiles()
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
        assert torch.equal(model(x), logits)
        assert torch.equal(model.forward_features(x), emb)
    assert logits.shape == (2, len(DEFAULT_CLASSES))
    assert emb.shape == (2, model.embedding_dim) == (2, BACKBONES[name].embedding_dim)
    assert torch.isfinite(logits).all() and torch.isfinite(emb).all()
    # the two tiles differ, so must their embeddings (the backbone is really used); relative
    # check because a randomly initialised EfficientNet in eval mode has tiny activations
    assert (emb[0] - emb[1]).abs().max() > 1e-3 * emb.abs().max() > 0


def test_unknown_backbone_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as exc:
        PatchClassifier("resnet1000")
    msg = str(exc.value)
    assert "resnet1000" in msg and "resnet18" in msg and "efficientnet_b0" in msg and "\n" not in msg


def test_bad_classes_and_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="unique"):
        PatchClassifier("mobilenet_v3_small", classes=("pallor", "pallor"))
    with pytest.raises(ConfigError, match="dropout"):
        PatchClassifier("mobilenet_v3_small", dropout=1.0)
    model = PatchClassifier("mobilenet_v3_small", classes=("a", "b"))
    assert model.class_index("b") == 1
    with pytest.raises(ValueError, match="float tensor"):
        model(torch.zeros(1, 3, SMALL, SMALL, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 4, SMALL, SMALL))


def test_to_tensor_batch_normalises_and_keeps_layout() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out = to_tensor_batch(tiles, mean, std)
    want = (tiles.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), want.transpose(0, 3, 1, 2), atol=1e-5)
    cl = to_tensor_batch(torch.from_numpy(tiles), mean, std, channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.allclose(cl, out)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor_batch(tiles.astype(np.float32))


# --------------------------------------------------------------------------- initial weights


def _fill(module: torch.nn.Module, seed: int) -> None:
    """Deterministic non-default values in every float tensor (variances kept positive)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in module.state_dict().items():
            if key.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif t.is_floating_point():
                t.copy_(0.1 * torch.randn(t.shape, generator=g))


def test_torchvision_state_dict_loads_into_backbone(tmp_path: Path) -> None:
    ref = tvm.resnet18(weights=None)  # a full torchvision model, ImageNet head (fc.*) included
    _fill(ref, seed=1)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = PatchClassifier("resnet18")
    head_before = model.head.weight.clone()
    load_backbone_weights(model, path)
    got = model.backbone.state_dict()
    for key, value in ref.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(got[key], value), key
    assert torch.equal(model.head.weight, head_before)  # our head is untouched


def test_torchvision_safetensors_loads_into_mobilenet(tmp_path: Path) -> None:
    ref = tvm.mobilenet_v3_small(weights=None)
    _fill(ref, seed=2)
    path = tmp_path / "mnv3.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    model = PatchClassifier("mobilenet_v3_small")
    load_backbone_weights(model, path)
    # the pre-logit layer classifier.0 is kept and loaded; classifier.3 (ImageNet logits) ignored
    assert torch.equal(model.backbone.state_dict()["classifier.0.weight"], ref.state_dict()["classifier.0.weight"])


def test_mismatched_backbone_weights_are_refused_naming_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(tvm.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as exc:
        load_backbone_weights(PatchClassifier("resnet18"), path)
    msg = str(exc.value)
    assert str(path) in msg and "layer1.2." in msg and "unexpected" in msg

    sd = tvm.resnet18(weights=None).state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    bad = tmp_path / "bad_shape.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(WeightsError, match=r"conv1\.weight.*\(64, 3, 5, 5\)") as exc:
        load_backbone_weights(PatchClassifier("resnet18"), bad)
    assert str(bad) in str(exc.value)

    with pytest.raises(WeightsError, match="not found"):
        load_backbone_weights(PatchClassifier("resnet18"), tmp_path / "absent.pth")


class _Payload:
    """Pickles to a call of os.mkdir: proof of code execution if the file were unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (str(self.target),))


def test_pickle_payload_in_weights_file_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "evil": _Payload(marker)}, path)
    with pytest.raises(WeightsError) as exc:
        load_backbone_weights(PatchClassifier("resnet18"), path)
    assert str(path) in str(exc.value) and "cannot read weights safely" in str(exc.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- bundle


class _TrainCfg(StrictModel):
    backbone: str = "resnet18"
    lr: float = 1e-3


def _contract(model: PatchClassifier, **overrides: object) -> BundleContract:
    cfg = _TrainCfg()
    data: dict[str, object] = dict(
        name="nme-demo",
        version="0.1.0",
        label=DEMO_MODEL_LABEL,
        architecture=ArchitectureSpec.of(model),
        thresholds=dict.fromkeys(model.classes, 0.5),
        training=TrainingSpec.from_config(cfg, code_version="0.1.0+test", metrics={"val_auc": 0.9}),
        aggregator=AggregatorSpec(type="gated_attention", params={"embedding_dim": 4}, weights="aggregator"),
    )
    data.update(overrides)
    return BundleContract(**data)


@pytest.fixture(scope="module")
def trained_model() -> PatchClassifier:
    torch.manual_seed(0)
    model = PatchClassifier("resnet18", dropout=0.2)
    _fill(model, seed=3)
    return model.eval()


@pytest.fixture
def bundle_dir(tmp_path: Path, trained_model: PatchClassifier) -> Path:
    d = tmp_path / "bundle"
    save_bundle(
        d,
        trained_model,
        _contract(trained_model),
        extra_tensors={"aggregator": {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}},
    )
    return d


def test_bundle_round_trip_gives_identical_outputs(bundle_dir: Path, trained_model: PatchClassifier) -> None:
    loaded = load_bundle(bundle_dir, device="cpu")
    assert not loaded.model.training
    x = _tiles(3, seed=5)
    with torch.no_grad():
        want_logits, want_emb = trained_model.forward_with_embedding(x)
        got_logits, got_emb = loaded.model.forward_with_embedding(x)
    assert torch.isfinite(want_logits).all() and want_logits.std() > 0
    assert torch.equal(want_logits, got_logits) and torch.equal(want_emb, got_emb)
    assert torch.equal(loaded.extra["aggregator"]["w"], torch.arange(6.0).reshape(2, 3))
    assert set(loaded.extra) == {"aggregator"}
    c = loaded.contract
    assert c.label == DEMO_MODEL_LABEL and c.architecture == ArchitectureSpec.of(trained_model)
    assert c.training.config == {"backbone": "resnet18", "lr": 0.001}
    assert c.training.config_sha256.startswith(config_hash(_TrainCfg()))
    assert c.training.created.tzinfo is not None
    assert loaded.sha256 == bundle_sha256(bundle_dir) and len(loaded.sha256) == 64
    raw = json.loads((bundle_dir / "bundle.json").read_text())
    assert {
        "format_version",
        "name",
        "version",
        "label",
        "architecture",
        "input",
        "thresholds",
        "training",
        "aggregator",
        "calibration",
        "bands",
        "weights_sha256",
    } == set(raw)
    tissue = raw["input"].pop("tissue")
    assert raw["input"] == {
        "mpp": 0.5,
        "mpp_tolerance": 0.1,
        "tile_size_px": 224,
        "channel_order": "RGB",
        "normalisation": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "overlap": 0.0,
        "min_tissue": 0.1,
    }
    assert tissue == TissueConfig().model_dump(mode="json") and raw["format_version"] == 2
    assert read_contract(bundle_dir) == c


def test_tampered_weights_are_refused_naming_the_file(bundle_dir: Path) -> None:
    wpath = bundle_dir / "model.safetensors"
    blob = bytearray(wpath.read_bytes())
    blob[-10] ^= 0xFF  # one flipped bit pattern in a weight
    wpath.write_bytes(bytes(blob))
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_dir)
    assert "model.safetensors" in str(exc.value) and "sha256" in str(exc.value)


def _rewrite_contract(d: Path, **changes: object) -> None:
    raw = json.loads((d / "bundle.json").read_text())
    raw.update(changes)
    (d / "bundle.json").write_text(json.dumps(raw))


def test_weights_not_matching_architecture_are_refused(bundle_dir: Path) -> None:
    raw = json.loads((bundle_dir / "bundle.json").read_text())
    _rewrite_contract(bundle_dir, architecture={**raw["architecture"], "backbone": "resnet34"})
    with pytest.raises(BundleError) as exc:
        load_bundle(bundle_dir)
    msg = str(exc.value)
    assert "model.safetensors" in msg and "resnet34" in msg and "missing" in msg and "layer1.2." in msg


def test_pickle_payload_as_bundle_weights_is_refused_not_executed(bundle_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "payload_ran"
    wpath = bundle_dir / "model.safetensors"
    torch.save({"patch.head.weight": _Payload(marker)}, wpath)  # a pickle where safetensors belongs
    import hashlib

    _rewrite_contract(bundle_dir, weights_sha256=hashlib.sha256(wpath.read_bytes()).hexdigest())
    with pytest.raises(BundleError, match="not a valid safetensors file") as exc:
        load_bundle(bundle_dir)
    assert str(wpath) in str(exc.value)
    assert not marker.exists()


def test_bundle_missing_files_and_wrong_version(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nowhere")
    _rewrite_contract(bundle_dir, format_version=3)
    with pytest.raises(BundleError, match=r"bundle\.json: format_version 3 not supported"):
        load_bundle(bundle_dir)
    _rewrite_contract(bundle_dir, format_version=2, thresholds={"pallor": 0.5})
    with pytest.raises(BundleError, match=r"bundle\.json.*thresholds must name exactly the classes"):
        load_bundle(bundle_dir)
    (bundle_dir / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors missing"):
        bundle_sha256(bundle_dir)
    (bundle_dir / "bundle.json").unlink()
    with pytest.raises(BundleError, match=r"bundle\.json missing"):
        load_bundle(bundle_dir)


def test_save_refuses_inconsistent_contract_and_nan(tmp_path: Path, trained_model: PatchClassifier) -> None:
    other = ArchitectureSpec(backbone="resnet18", classes=["pallor"], embedding_dim=512)
    with pytest.raises(BundleError, match="does not describe the model"):
        save_bundle(
            tmp_path / "a", trained_model, _contract(trained_model, architecture=other, thresholds={"pallor": 0.5})
        )
    with pytest.raises(BundleError, match="aggregator.weights"):
        save_bundle(tmp_path / "b", trained_model, _contract(trained_model))  # no 'aggregator' section given
    with pytest.raises(BundleError, match="NaN"):
        save_bundle(
            tmp_path / "c",
            trained_model,
            _contract(trained_model, aggregator=None),
            extra_tensors={"aggregator": {"w": torch.tensor([float("nan")])}},
        )
    with pytest.raises(BundleError, match="section name"):
        save_bundle(
            tmp_path / "d",
            trained_model,
            _contract(trained_model, aggregator=None),
            extra_tensors={"patch": {"w": torch.ones(1)}},
        )
    assert not (tmp_path / "c" / "bundle.json").exists()


def test_check_mpp_refuses_wrong_scale(trained_model: PatchClassifier) -> None:
    contract = _contract(trained_model)
    contract.check_mpp(0.5)
    contract.check_mpp(0.52)  # 4 % off: a 0.26 µm/px scanner read at downsample 2
    with pytest.raises(MPPError) as exc:
        contract.check_mpp(0.25, source="slide.svs")
    assert "slide.svs" in str(exc.value) and "0.25" in str(exc.value) and "0.5" in str(exc.value)
    with pytest.raises(MPPError):
        contract.check_mpp(1.0)
    with pytest.raises(MPPError, match="unknown"):
        contract.check_mpp(None)
    with pytest.raises(MPPError):
        contract.check_mpp(float("nan"))


# --------------------------------------------------------------------------- MIL

EMB, PROBS = 8, 4
KINDS = [GatedAttentionMIL, MeanPoolMIL, MaxPoolMIL]


def _agg(cls: type, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    extra = {"attention_dim": 16} if cls is GatedAttentionMIL else {}
    return cls(embedding_dim=EMB, tile_prob_dim=PROBS, hidden_dim=32, **extra).eval()


def _bag(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(n, EMB, generator=g), torch.rand(n, PROBS, generator=g)], dim=1)


@pytest.mark.parametrize("cls", KINDS)
def test_mil_output_shapes_and_attention(cls: type) -> None:
    agg = _agg(cls)
    out = agg(_bag(7))
    assert out.logit.shape == () and out.pattern_logits.shape == (3,) and out.attention.shape == (7,)
    assert (out.attention >= 0).all() and math.isclose(out.attention.sum().item(), 1.0, rel_tol=1e-5)
    one = agg(_bag(1))
    assert one.attention.shape == (1,) and one.attention.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty bag"):
        agg(_bag(0))
    with pytest.raises(ValueError, match="empty bag"):
        agg(_bag(3), mask=torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="features must be"):
        agg(torch.zeros(3, EMB))


@pytest.mark.parametrize("cls", KINDS)
def test_mil_is_permutation_invariant(cls: type) -> None:
    agg = _agg(cls)
    bag = _bag(11, seed=4)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a, b = agg(bag), agg(bag[perm])
    assert torch.allclose(a.logit, b.logit, atol=1e-6)
    assert torch.allclose(a.pattern_logits, b.pattern_logits, atol=1e-6)
    assert torch.allclose(a.attention[perm], b.attention, atol=1e-6)


@pytest.mark.parametrize("cls", KINDS)
def test_mil_padded_batch_equals_single_bags(cls: type) -> None:
    agg = _agg(cls)
    bags = [_bag(n, seed=n) for n in (3, 9, 1)]
    feats, mask = pad_bags(bags)
    with torch.no_grad():
        batch = agg(feats, mask)
        for i, bag in enumerate(bags):
            single = agg(bag)
            assert torch.allclose(batch.logit[i], single.logit, atol=1e-5)
            assert torch.allclose(batch.pattern_logits[i], single.pattern_logits, atol=1e-5)
            assert torch.allclose(batch.attention[i, : len(bag)], single.attention, atol=1e-6)
            assert (batch.attention[i, len(bag) :] == 0).all()


def test_aggregator_rebuilds_from_hparams_and_state_dict() -> None:
    agg = _agg(GatedAttentionMIL)
    agg.fit_input_stats(torch.cat([_bag(20, seed=1), _bag(20, seed=2)]))
    params = json.loads(json.dumps(agg.hparams))  # survives JSON (the bundle's aggregator.params)
    rebuilt = build_aggregator("gated_attention", params)
    rebuilt.load_state_dict(agg.state_dict())
    rebuilt.eval()
    bag = _bag(5, seed=3)
    assert torch.equal(agg(bag).logit, rebuilt(bag).logit)
    with pytest.raises(ConfigError, match="allowed: gated_attention, max, mean"):
        build_aggregator("transformer", {})
    emb, probs = torch.randn(5, EMB), torch.rand(5, PROBS)
    assert agg.make_features(emb, probs).shape == (5, EMB + PROBS)
    with pytest.raises(ValueError, match="tile_probs"):
        agg.make_features(emb, None)


def _synthetic_bags(g: torch.Generator, n_bags: int) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """Half the bags carry 2 'lesional' tiles (shifted embedding) among 20-40 normal ones."""
    direction = torch.zeros(EMB)
    direction[0], direction[1] = 3.0, -3.0
    bags, labels, planted = [], [], []
    for i in range(n_bags):
        n = int(torch.randint(20, 41, (1,), generator=g))
        emb = torch.randn(n, EMB, generator=g)
        probs = torch.rand(n, PROBS, generator=g) * 0.3
        idx = torch.randperm(n, generator=g)[:2]
        if i % 2:
            emb[idx] += direction
        bags.append(torch.cat([emb, probs], dim=1))
        labels.append(float(i % 2))
        planted.append(idx)
    return bags, torch.tensor(labels), planted


def test_gated_attention_mil_learns_to_find_the_lesional_tiles() -> None:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(10)
    agg = GatedAttentionMIL(embedding_dim=EMB, tile_prob_dim=PROBS, hidden_dim=32, attention_dim=16, dropout=0.0)
    test_bags, test_y, planted = _synthetic_bags(g, 64)
    opt = torch.optim.Adam(agg.parameters(), lr=1e-2)
    agg.train()
    for _ in range(100):
        bags, y, _ = _synthetic_bags(g, 16)
        out = agg(*pad_bags(bags))
        loss = F.binary_cross_entropy_with_logits(out.logit, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    agg.eval()
    with torch.no_grad():
        out = agg(*pad_bags(test_bags))
    accuracy = ((out.logit > 0).float() == test_y).float().mean().item()
    assert accuracy >= 0.9, accuracy
    # attention goes to the 2 lesional tiles (uniform attention would give them about 0.07)
    mass = torch.stack([out.attention[i, planted[i]].sum() for i in range(64) if test_y[i] == 1]).mean().item()
    assert mass > 0.5, mass


# --------------------------------------------------------------------------- pattern statistics


def _hand_made_bag() -> tuple[np.ndarray, np.ndarray]:
    #            pallor necrol parak  epidermis     tile edge 100 level-0 px, radius 1.5 tiles
    probs = np.array(
        [
            [0.9, 0.1, 0.1, 0.9],  # t0 (0, 0)      epidermal, pallor
            [0.2, 0.8, 0.1, 0.8],  # t1 (100, 0)    epidermal, necrolysis
            [0.1, 0.1, 0.7, 0.6],  # t2 (200, 0)    epidermal, parakeratosis
            [0.6, 0.6, 0.6, 0.9],  # t3 (1000, 0)   epidermal, all three
            [0.3, 0.2, 0.1, 0.2],  # t4 (2000, 0)   dermis
            [0.1, 0.1, 0.1, 0.7],
        ]
    )  # t5 (3000, 0)   epidermal, nothing
    coords = np.array([[0, 0], [100, 0], [200, 0], [1000, 0], [2000, 0], [3000, 0]])
    return probs, coords


def test_pattern_statistics_on_hand_made_bag() -> None:
    stats = PatternStatistics(top_k=2, radius_tiles=1.5)
    probs, coords = _hand_made_bag()
    feats = dict(zip(stats.feature_names, stats(probs, coords, tile_size_px=100)))
    assert len(feats) == len(stats.feature_names) == 18
    expected = {
        "pallor_topk_mean": 0.75,
        "pallor_max": 0.9,
        "pallor_epi_mean": 0.38,
        "pallor_epi_pos_frac": 0.4,
        "necrolysis_topk_mean": 0.7,
        "necrolysis_max": 0.8,
        "necrolysis_epi_mean": 0.34,
        "necrolysis_epi_pos_frac": 0.4,
        "parakeratosis_topk_mean": 0.65,
        "parakeratosis_max": 0.7,
        "parakeratosis_epi_mean": 0.32,
        "parakeratosis_epi_pos_frac": 0.4,
        "epidermis_frac": 5 / 6,
        "epidermis_log1p_count": math.log(6),
        # neighbourhoods: t0-t1 and t1-t2 are adjacent; t3 is alone but has all three itself
        "cooccur_pallor_necrolysis_frac": 3 / 5,  # t0, t1, t3
        "cooccur_pallor_parakeratosis_frac": 2 / 5,  # t1, t3
        "cooccur_necrolysis_parakeratosis_frac": 3 / 5,  # t1, t2, t3
        "cooccur_all_frac": 2 / 5,  # t1 (pallor via t0, parakeratosis via t2), t3
    }
    for name, value in expected.items():
        assert feats[name] == pytest.approx(value), name
    # tensors in, same answer; a smaller radius removes the cross-tile co-occurrence
    same = stats(torch.from_numpy(probs).float(), torch.from_numpy(coords), tile_size_px=100)
    np.testing.assert_allclose(same, list(feats.values()), atol=1e-6)
    alone = dict(zip(stats.feature_names, PatternStatistics(top_k=2, radius_tiles=0.5)(probs, coords, 100)))
    assert alone["cooccur_all_frac"] == pytest.approx(1 / 5)
    with pytest.raises(ValueError, match="empty bag"):
        stats(np.zeros((0, 4)), np.zeros((0, 2)), 100)


def test_pattern_stats_classifier_fits_and_round_trips_json() -> None:
    stats = PatternStatistics()
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for i in range(40):
        n = 30
        probs = rng.uniform(0, 0.3, (n, 4))
        probs[:, 3] = rng.uniform(0.4, 1.0, n)
        if i % 2:  # NME-pattern slide: a patch of tiles with all three patterns
            probs[:6, :3] = rng.uniform(0.6, 1.0, (6, 3))
        coords = np.stack([np.arange(n) * 100, np.zeros(n)], axis=1)
        rows.append(stats(probs, coords, 100))
        labels.append(i % 2)
    X, y = np.stack(rows), np.array(labels)
    clf = PatternStatsClassifier(stats.feature_names).fit(X[:30], y[:30])
    p = clf.predict_proba(X[30:])
    assert p.shape == (10,) and ((p > 0.5) == y[30:].astype(bool)).all()
    reloaded = PatternStatsClassifier.from_json(json.loads(json.dumps(clf.to_json())))
    np.testing.assert_array_equal(reloaded.predict_proba(X), clf.predict_proba(X))
    assert set(clf.coefficients()) == set(stats.feature_names)
    with pytest.raises(DataError, match="single class"):
        PatternStatsClassifier(stats.feature_names).fit(X[:5], np.zeros(5))
    with pytest.raises(ConfigError, match="invalid"):
        PatternStatsClassifier.from_json({**clf.to_json(), "coef": [1.0]})


def test_format_1_bundle_loads_with_todays_tiling(bundle_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A bundle written before the tile grid and tissue settings were recorded still loads (with a note)."""
    data = json.loads((bundle_dir / "bundle.json").read_text())
    for key in ("overlap", "min_tissue", "tissue"):
        data["input"].pop(key, None)
    data["format_version"] = 1
    (bundle_dir / "bundle.json").write_text(json.dumps(data))
    with caplog.at_level("INFO", logger="models.bundle"):
        b = load_bundle(bundle_dir)
    assert b.contract.format_version == 1 and "records no tile grid or tissue settings" in caplog.text
    assert b.contract.input.tiling() == TilingConfig(
        target_mpp=b.contract.input.mpp,
        mpp_tolerance=b.contract.input.mpp_tolerance,
        tile_px=b.contract.input.tile_size_px,
    )
