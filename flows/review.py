"""The human review of cold-start examples: the flow pauses with a form in the Prefect UI.

The paper had annotators post-process the cold-start data; here rules do that, and a person
may approve or reject a sample of the examples (with a reason) before the dataset is written.
The form is a `RunInput`: Prefect shows the sample as the form's description and one
approve/reason entry per example. Unattended runs leave `cold_start.review.enabled` off, or
are resumed after `timeout_s` with the examples kept unreviewed.
"""
from __future__ import annotations

import random

from prefect import get_run_logger, pause_flow_run
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from pydantic import BaseModel, Field

from r1core.config import ReviewConfig


class ExampleDecision(BaseModel):
    id: str = Field(description="example id (see the table above)")
    approve: bool = Field(True, description="keep this example in the cold-start dataset")
    reason: str = Field("", description="why it is rejected (or any remark)")


class ColdStartReview(RunInput):
    decisions: list[ExampleDecision]


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


def review_form_description(sample: list[dict]) -> str:
    rows = [f"| `{e['id']}` | {e['route']} | {e['language']} | {_cell(e['question'])} "
            f"| {_cell(e['completion'])} |" for e in sample]
    return "\n".join([
        "### Cold-start examples to review",
        "Untick **approve** (and give a reason) for any example that should not be trained on.",
        "", "| id | route | lang | question | completion |", "|---|---|---|---|---|", *rows,
    ])


def review_examples(examples: list[dict], cfg: ReviewConfig, seed: int = 0) -> list[dict]:
    """Pause the flow for a review of a sample of `examples`; returns the decisions
    `{id, approve, reason}`. On timeout the flow goes on with no decisions."""
    logger = get_run_logger()
    sample = random.Random(seed).sample(examples, min(cfg.sample_size, len(examples)))
    form = ColdStartReview.with_initial_data(
        description=review_form_description(sample),
        decisions=[ExampleDecision(id=e["id"]) for e in sample],
    )
    logger.info("waiting up to %d s for a review of %d examples in the Prefect UI", cfg.timeout_s, len(sample))
    try:
        review = pause_flow_run(wait_for_input=form, timeout=cfg.timeout_s, key="cold-start-review")
    except FlowPauseTimeout:
        _resume_unreviewed()
        logger.warning("no review within %d s: keeping the examples unreviewed", cfg.timeout_s)
        return []
    shown = {e["id"] for e in sample}
    decisions = [d.model_dump() for d in review.decisions if d.id in shown]
    logger.info("review: %d approved, %d rejected", sum(d["approve"] for d in decisions),
                sum(not d["approve"] for d in decisions))
    return decisions


def _resume_unreviewed() -> None:
    """Put the timed-out flow run back to Running (the server may have failed the expired
    pause meanwhile), so that the rest of the flow can run."""
    from prefect.client.orchestration import get_client
    from prefect.states import Running

    flow_run_id = get_run_context().flow_run.id
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Running(), force=True)
