"""The planner's arithmetic, verdicts and advice, checked against the design figures."""

from __future__ import annotations

import pytest
import yaml

from evaclip import plan as planner
from evaclip.cli import main
from evaclip.errors import UserError
from evaclip.manifest import parse_resource
from evaclip.models import count_parameters
from evaclip.models.presets import PRESETS

GB = 1e9


def _resource(**spec_overrides):
    spec = {
        "model": {"preset": "eva-clip-18b", "precision": "bf16"},
        "data": {"train": "s3://bucket/train"},
        "method": {"type": "full"},
        "training": {"batchSize": 64},
        "deepspeed": {"zeroStage": 2, "activationCheckpointing": True},
        "resources": {"nodes": 1, "gpusPerNode": 8, "gpuMemoryGib": 80},
        "output": "s3://bucket/out",
    }
    for key, value in spec_overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_resource({
        "apiVersion": "training.evaclip.io/v1alpha1", "kind": "EvaClipFinetune",
        "metadata": {"name": "plan-test"}, "spec": spec,
    })


def test_18b_parameter_count_matches_design() -> None:
    counts = planner.plan(_resource()).counts
    # DESIGN.md: 17.63 B vision tower; the classifier head adds about 1.5 M.
    assert counts.total == pytest.approx(17.63e9, rel=0.005)
    assert counts.trained == counts.total


def test_18b_full_model_state_matches_design_arithmetic() -> None:
    """16 B per trained parameter: about 282 GB in all, about 35 GB per GPU under ZeRO-3 on 8."""
    zero3 = planner.plan(_resource(deepspeed={"zeroStage": 3}))
    state = zero3.weights + zero3.gradients + zero3.optimizer
    assert state * 8 == pytest.approx(282e9, rel=0.10)
    assert state == pytest.approx(35e9, rel=0.10)
    # DESIGN.md: the MLP intermediate of one image in one block is about 13 MB in bf16.
    preset_tokens, hidden = 257, 25600
    assert preset_tokens * hidden * 2 == pytest.approx(13e6, rel=0.02)


def test_18b_full_on_8x80_needs_zero3_or_offload_and_says_what_then_fits() -> None:
    result = planner.plan(_resource())
    assert not result.fits
    advice = {ch.description: ch.plan for ch in result.advice}
    zero3 = next(p for d, p in advice.items() if d.startswith("set deepspeed.zeroStage: 3"))
    assert zero3.fits and zero3.spec.deepspeed.zero_stage == 3
    assert any("offloadOptimizer: cpu" in d for d in advice)
    # The advice is re-planned, not canned: every suggested plan fits and differs from the
    # original in the named field.
    assert all(p.fits for p in advice.values())
    table = result.table()
    assert "Does not fit" in table and "zeroStage: 3" in table
    assert "optimizer states" in table and "activations" in table


def test_zero_stages_partition_what_they_should() -> None:
    plans = {s: planner.plan(_resource(deepspeed={"zeroStage": s})) for s in range(4)}
    n = plans[0].counts.trained
    assert plans[0].optimizer == n * 12
    # ZeRO-1 keeps whole 16-bit gradients; ZeRO-1/2 add the fp32 gradient partition.
    assert plans[1].optimizer == n * 12 // 8 and plans[1].gradients == n * 2 + n * 4 // 8
    assert plans[2].gradients == n * 2 // 8 + n * 4 // 8
    assert plans[2].weights == plans[0].weights
    assert plans[3].weights == plans[0].weights // 8
    assert plans[0].total > plans[1].total > plans[2].total > plans[3].total


def test_offload_moves_state_to_host() -> None:
    base = planner.plan(_resource(deepspeed={"zeroStage": 3}))
    off = planner.plan(_resource(deepspeed={"zeroStage": 3, "offloadOptimizer": "cpu",
                                            "offloadParameters": "cpu"}))
    assert off.optimizer == 0 and off.weights == 0
    assert off.host_per_node == (base.optimizer + base.weights) * 8


def test_checkpointing_and_batch_change_activations_only() -> None:
    ckpt = planner.plan(_resource())
    plain = planner.plan(_resource(deepspeed={"activationCheckpointing": False}))
    assert plain.activations > 5 * ckpt.activations
    assert plain.weights == ckpt.weights and plain.optimizer == ckpt.optimizer
    half = planner.plan(_resource(training={"batchSize": 32}))
    assert half.activations == pytest.approx(ckpt.activations / 2, rel=0.01)


def test_lora_and_partial_count_trained_parameters() -> None:
    lora = planner.plan(_resource(method={"type": "lora", "lora": {"rank": 8}})).counts
    # qkv [3W, W] and proj [W, W] in each of 48 blocks: r * (in + out) each, plus the head.
    w = 5120
    adapters = 48 * 8 * ((w + 3 * w) + (w + w))
    assert lora.trained - 1536 * 1000 - 1000 == adapters
    partial = planner.plan(_resource(method={"type": "partial",
                                             "partial": {"trainableBlocks": 2}})).counts
    # Two blocks of 367.05 M, the final norm, the 5120 -> 1536 projection and the head.
    above_blocks = w + w * 1536 + 1536 * 1000 + 1000
    assert partial.trained - above_blocks == pytest.approx(2 * 367.05e6, rel=0.001)
    assert partial.active_blocks == 2


def test_lora_targets_matching_nothing_is_refused() -> None:
    res = _resource(method={"type": "lora", "lora": {"targetModules": ["nothing_here"]}})
    with pytest.raises(UserError, match="spec.method.lora.targetModules"):
        planner.plan(res)
    # An invalid pattern is refused by the spec itself, before any planning.
    with pytest.raises(UserError, match="spec.method.lora.targetModules"):
        planner.plan(_resource(method={"type": "lora", "lora": {"targetModules": ["(unclosed"]}}))
    # A regular expression that catches the patch embedding's Conv2d is not a linear.
    res = _resource(method={"type": "lora", "lora": {"targetModules": [r".*\.proj"]}})
    with pytest.raises(UserError, match="not a linear layer"):
        planner.plan(res)


def test_require_fit_names_the_field_and_the_change() -> None:
    with pytest.raises(UserError) as err:
        planner.require_fit(_resource())
    text = str(err.value)
    assert "spec.resources.gpuMemoryGib" in text and "zeroStage: 3" in text
    assert "\n" not in text
    assert planner.require_fit(_resource(deepspeed={"zeroStage": 3})).fits


def test_cpu_runs_are_checked_against_pod_memory_when_given() -> None:
    cpu = {"nodes": 1, "gpusPerNode": 0}
    tiny = dict(model={"preset": "eva-clip-18b-tiny", "precision": "fp32"})
    unchecked = planner.plan(_resource(resources=cpu, **tiny))
    assert unchecked.fits and not unchecked.checked
    assert "not checked" in unchecked.table()
    small = planner.plan(_resource(resources={**cpu, "memory": "1Mi"}, **tiny))
    assert small.checked and not small.fits
    assert planner.plan(_resource(resources={**cpu, "memory": "8Gi"}, **tiny)).fits


def test_evaclip_plan_exit_codes(tmp_path, capsys) -> None:
    def write(resource) -> str:
        path = tmp_path / f"{resource.spec.deepspeed.zero_stage}.yaml"
        doc = {"apiVersion": "training.evaclip.io/v1alpha1", "kind": "EvaClipFinetune",
               "metadata": {"name": "p"},
               "spec": resource.spec.model_dump(mode="json", by_alias=True)}
        path.write_text(yaml.safe_dump(doc))
        return str(path)

    assert main(["plan", write(_resource())]) == 1
    out = capsys.readouterr().out
    assert "Does not fit" in out and "Smallest change that fits" in out
    assert main(["plan", write(_resource(deepspeed={"zeroStage": 3}))]) == 0
    assert "Fits:" in capsys.readouterr().out


@pytest.mark.parametrize("preset", [p.name for p in PRESETS.values() if not p.test_only])
def test_every_published_preset_plans_from_its_meta_tower(preset) -> None:
    result = planner.plan(_resource(model={"preset": preset}))
    embed = PRESETS[preset].embed_dim
    assert result.counts.total == count_parameters(preset) + embed * 1000 + 1000
    assert result.total > result.weights > 0


def _default_18b(**overrides):
    """eva-clip-18b, full, 1 node x 8 GPUs of 80 GiB, every other setting the spec default."""
    spec = {
        "model": {"preset": "eva-clip-18b"},
        "data": {"train": "s3://bucket/train"},
        "method": {"type": "full"},
        "resources": {"nodes": 1, "gpusPerNode": 8, "gpuMemoryGib": 80},
        "output": "s3://bucket/out",
        **overrides,
    }
    return parse_resource({
        "apiVersion": "training.evaclip.io/v1alpha1", "kind": "EvaClipFinetune",
        "metadata": {"name": "plan-default"}, "spec": spec,
    })


def test_acceptance_18b_full_on_8x80_with_defaults_needs_zero3_or_offload() -> None:
    resource = _default_18b()
    assert resource.spec.deepspeed.zero_stage == 2 and resource.spec.training.batch_size == 32
    result = planner.plan(resource)
    assert not result.fits
    # On these 8 GPUs, with a useful batch, only ZeRO-3 or offload fits; checkpointing alone
    # does not (the model state of ZeRO-2 is about 70 GiB of the 72 usable).
    same_gpus = [ch.updates for ch in result.advice
                 if "resources.nodes" not in ch.updates
                 and ch.updates.get("training.batch_size", 32) >= 4]
    assert same_gpus and all(
        u.get("deepspeed.zero_stage") == 3 or u.get("deepspeed.offload_optimizer") == "cpu"
        for u in same_gpus)
    assert not planner.plan(_default_18b(deepspeed={"activationCheckpointing": True})).fits
    first = result.advice[0]
    assert first.plan.fits and first.plan.spec.deepspeed.zero_stage == 3
    table = result.table()
    assert "Does not fit" in table
    assert f"Smallest change that fits: {first.description}" in table
    # The tower count is the one `evaclip model info` prints; the head comes on top.
    assert f"tower {count_parameters('eva-clip-18b'):,}, head " in table
    # Under ZeRO-3 the model state is DESIGN.md's 16 B per parameter over 8 GPUs, ~35 GB.
    zero3 = first.plan
    assert zero3.weights + zero3.gradients + zero3.optimizer == pytest.approx(35e9, rel=0.10)


def test_zero2_model_state_is_deepspeeds_own_estimate() -> None:
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    result = planner.plan(_default_18b())
    n = result.counts.total
    _, gpu = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, num_nodes=1,
                                                   cpu_offload=False)
    assert result.weights + result.gradients + result.optimizer == pytest.approx(gpu, rel=1e-6)
    off = planner.plan(_default_18b(deepspeed={"offloadOptimizer": "cpu"}))
    _, gpu_off = estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=8, num_nodes=1,
                                                       cpu_offload=True)
    # With offload DeepSpeed counts only the 16-bit weights on the GPU; the 16-bit gradient
    # partition (2 B / 8) stays there too.
    assert off.weights + off.optimizer == pytest.approx(gpu_off, rel=1e-6)
    assert off.gradients == n * 2 // 8


def test_host_memory_is_checked_for_gpu_jobs_when_set() -> None:
    offload = {"zeroStage": 3, "activationCheckpointing": True, "offloadOptimizer": "cpu",
               "offloadParameters": "cpu"}
    small = planner.plan(_resource(deepspeed=offload,
                                   resources={"memory": "64Gi"}))
    assert small.total <= small.usable  # the GPUs would hold it
    assert small.host_per_node > 200 * 2**30 and not small.host_fits and not small.fits
    table = small.table()
    assert "Does not fit" in table and "host memory" in table
    changes = [ch.updates for ch in small.advice]
    assert {"resources.memory": "256Gi"} in changes
    assert any(set(u) == {"resources.nodes"} for u in changes)
    assert all(ch.plan.fits and ch.plan.host_fits for ch in small.advice)
    with pytest.raises(UserError, match=r"^spec\.resources\.memory: .*host memory per node"):
        planner.require_fit(small.spec)
    assert planner.plan(_resource(deepspeed=offload, resources={"memory": "256Gi"})).fits
    unset = planner.plan(_resource(deepspeed=offload))
    assert unset.fits
    assert "not checked (resources.memory is not set)" in unset.table()
    assert "at least 256Gi" in unset.table()


@pytest.mark.parametrize(("override", "field"), [
    ({"zero_optimization": {"stage": 3}}, "spec.deepspeed.zeroStage"),
    ({"fp16": {"enabled": True}}, "spec.model.precision"),
    ({"bf16": {"enabled": False}}, "spec.model.precision"),
    ({"train_batch_size": 1000}, "spec.training.batchSize"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}},
     "spec.deepspeed.offloadOptimizer"),
    ({"gradient_clipping": 0.5}, "spec.training.gradientClipping"),
])
def test_deepspeed_overrides_of_spec_fields_are_refused(override, field) -> None:
    with pytest.raises(UserError) as err:
        planner.plan(_resource(deepspeed={"config": override}))
    text = str(err.value)
    assert text.startswith("spec.deepspeed.config: ") and field in text and "\n" not in text


def test_other_deepspeed_overrides_are_planned_as_before() -> None:
    base = planner.plan(_resource())
    tuned = planner.plan(_resource(deepspeed={"config": {
        "zero_optimization": {"reduce_bucket_size": 1000,
                              "offload_optimizer": {"pin_memory": False}},
        "bf16": {"immediate_grad_update": True}}}))
    assert tuned.total == base.total


def test_advice_lists_each_set_of_changes_once() -> None:
    result = planner.plan(_resource(deepspeed={"activationCheckpointing": False}))
    keys = [frozenset(ch.updates.items()) for ch in result.advice]
    assert len(keys) == len(set(keys)) and len(keys) >= 2
    # No suggestion merely adds to another one that fits alone.
    assert not any(a < b for a in keys for b in keys)


def test_cpu_plans_are_per_process_and_take_nproc(capsys, tmp_path) -> None:
    cpu = dict(model={"preset": "eva-clip-18b-tiny", "precision": "fp32"},
               resources={"nodes": 1, "gpusPerNode": 0, "memory": "8Gi"})
    one, two = (planner.plan(_resource(**cpu), processes=k) for k in (1, 2))
    assert (one.world_size, two.world_size) == (1, 2)
    assert two.optimizer == one.optimizer // 2  # ZeRO-2 partitions over both processes
    assert two.capacity < one.capacity  # the pod's memory is shared by its processes
    doc = {"apiVersion": "training.evaclip.io/v1alpha1", "kind": "EvaClipFinetune",
           "metadata": {"name": "p"},
           "spec": _resource(**cpu).spec.model_dump(mode="json", by_alias=True)}
    path = tmp_path / "cpu.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["plan", str(path), "--nproc", "2"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert "2 local process(es)" in head and "world size 2" in head and "--nproc" in head


# --- planning without torch: the committed shape table ---------------------------------


def test_shape_table_matches_the_meta_towers_of_every_preset() -> None:
    """Fails when evaclip/models/shapes.json is stale; regenerate it with
    `python -m evaclip.plan --write-shapes`."""
    import json

    committed = json.loads(planner.SHAPES_FILE.read_text())
    assert set(committed["presets"]) == set(PRESETS)
    for name in PRESETS:
        meta = planner._tower_shape(name)  # torch is here: the meta tower
        table = planner._expand(committed["presets"][name])
        assert sorted(table[0]) == sorted(meta[0]), f"{name}: parameters differ"
        assert sorted(table[1]) == sorted(meta[1]), f"{name}: modules differ"


_NO_TORCH = """
import json, sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from evaclip import plan
from evaclip.errors import UserError
from evaclip.manifest import parse_resource
out = {}
for key, doc in json.loads(sys.stdin.read()).items():
    try:
        r = plan.plan(parse_resource(doc))
        out[key] = [r.counts.total, r.counts.trained, r.total, r.fits,
                    [c.description for c in r.advice]]
    except UserError as err:
        out[key] = str(err)
assert sys.modules["torch"] is None
print(json.dumps(out))
"""


def test_plans_without_torch_equal_those_with_it() -> None:
    import json
    import subprocess
    import sys

    cases = {
        "full-18b": _resource(),
        "default-18b": _default_18b(),
        "lora-e14": _resource(model={"preset": "eva02-clip-e14-plus"},
                              method={"type": "lora", "lora": {"includeMlp": True}}),
        "partial-8b": _resource(model={"preset": "eva-clip-8b"},
                                method={"type": "partial", "partial": {"trainableBlocks": 3}}),
        "lora-nothing": _resource(method={"type": "lora",
                                          "lora": {"targetModules": ["nothing_here"]}}),
        "lora-conv": _resource(method={"type": "lora", "lora": {"targetModules": [r".*\.proj"]}}),
    }
    docs = {k: r.model_dump(mode="json", by_alias=True) for k, r in cases.items()}
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH], input=json.dumps(docs),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    without = json.loads(proc.stdout)
    for key, resource in cases.items():
        try:
            r = planner.plan(resource)
            expected = [r.counts.total, r.counts.trained, r.total, r.fits,
                        [c.description for c in r.advice]]
        except UserError as err:
            expected = str(err)
        assert without[key] == expected, key
    assert "matches no linear layer" in without["lora-nothing"]
    assert "not a linear layer" in without["lora-conv"]


def test_plan_outputs_quoted_in_the_docs_are_the_tools(tmp_path, capsys) -> None:
    """docs/finetuning.md quotes `evaclip plan X.yaml` for manifests it shows as
    ```yaml # X.yaml```; each quote must be what the tool prints for that manifest."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "finetuning.md").read_text()
    manifests = dict(re.findall(r"```yaml\n# (\S+\.yaml)\n(.*?)```", doc, re.S))
    quoted = re.findall(r"```\n\$ evaclip plan (\S+\.yaml)\n(.*?)```", doc, re.S)
    assert len(quoted) >= 2
    for name, output in quoted:
        (tmp_path / name).write_text(manifests[name])
        main(["plan", str(tmp_path / name)])
        assert capsys.readouterr().out == output, name
