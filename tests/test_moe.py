"""The DeepSeek-V3-style option: multi-head latent attention and MoE FFNs with shared experts
after dense first layers, built by the model factory and trained through the pipeline's stages."""
import json
import os

import pytest

from r1core.config import CONFIG_DIR, ModelConfig, load_config
from r1core.modeling import build_model, num_parameters

MOE = ["model.architecture=deepseek_v3", "model.num_layers=2", "model.moe.routed_experts=4",
       "model.moe.experts_per_token=2", "model.moe.shared_experts=1", "model.moe.first_dense_layers=1",
       "model.moe.expert_intermediate_size=32", "model.moe.kv_lora_rank=16", "model.moe.qk_rope_head_dim=8",
       "model.moe.qk_nope_head_dim=8", "model.moe.v_head_dim=16"]


def test_factory_builds_mla_and_moe_with_shared_experts(tokenizer):
    cfg = load_config(CONFIG_DIR / "micro.yaml", MOE).model
    model = build_model(cfg, tokenizer)
    layers = model.model.layers
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert hasattr(layers[0].self_attn, "kv_a_proj_with_mqa")  # keys and values through a low-rank latent
    assert not hasattr(layers[0].mlp, "experts")  # first layer dense
    assert len(layers[1].mlp.experts.gate_up_proj) == 4 and hasattr(layers[1].mlp, "shared_experts")
    assert num_parameters(model) > num_parameters(build_model(ModelConfig(**{**cfg.model_dump(), "architecture": "llama"}),
                                                              tokenizer))


def test_moe_config_is_checked():
    from r1core.config import ConfigError

    with pytest.raises(ConfigError, match="field 'model.moe'"):
        load_config(CONFIG_DIR / "micro.yaml", ["model.moe.routed_experts=2", "model.moe.experts_per_token=3"])


@pytest.mark.slow
def test_moe_model_trains_through_the_pipeline_stages(tmp_path):
    """Stage 0 (pretraining) and stage 1 (R1-Zero GRPO) of the micro profile with the MoE model,
    through real Prefect, Ray Train and MLflow; the registered model is a DeepSeek-V3."""
    import ray
    from mlflow import MlflowClient
    from prefect.testing.utilities import prefect_test_harness

    from flows.stage_flows import pretrain_base_flow, r1_zero_flow
    from tasks.tracking import tracking_uri

    cfg = load_config(CONFIG_DIR / "micro.yaml", [*MOE, f"runtime.workdir={tmp_path}"])
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path / "prefect-results")
    try:
        with prefect_test_harness(server_startup_timeout=120):
            base = pretrain_base_flow(config=cfg)
            zero = r1_zero_flow(config=cfg, init_model=base.model_dir)
    finally:
        ray.shutdown()
        os.environ.pop("PREFECT_LOCAL_STORAGE_PATH", None)
    for result in (base, zero):
        assert json.loads((tmp_path / result.model_dir / "config.json").read_text())["model_type"] == "deepseek_v3"
    client = MlflowClient(tracking_uri(cfg.runtime))
    assert [m.step for m in client.get_metric_history(base.mlflow_run_id, "loss")][-1] == cfg.pretrain.steps
    assert [m.step for m in client.get_metric_history(zero.mlflow_run_id, "reward")] == [1, 2]
    assert "eval/pass_at_1" in client.get_run(zero.mlflow_run_id).data.metrics
    assert client.get_model_version_by_alias("r1-zero", "newest").run_id == zero.mlflow_run_id
