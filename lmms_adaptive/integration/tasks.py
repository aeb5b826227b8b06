"""lmms-eval tasks as scored requests: each task's own prompts, images and generation kwargs, and its own
`process_results` as the score. Profiling and GRPO training draw their samples from here.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmms_adaptive.serving.request import DEFAULT_MAX_NEW_TOKENS, Request, generation_config, task_style


class DecodedDocs:
    """A task's eval docs, decoded when used: a row and its images (the task's `doc_to_visual`) are decoded on
    first use and the `keep` most recently used stay, so a split of thousands of images is never held decoded,
    while a sample served under several plans in a row is decoded once."""

    def __init__(self, docs: Any, doc_to_visual: Callable[[Any], Any], keep: int = 16) -> None:
        self.docs, self.doc_to_visual, self.keep = docs, doc_to_visual, keep
        self._recent: OrderedDict[int, tuple[Any, list[Any]]] = OrderedDict()

    def __getitem__(self, doc_id: int) -> tuple[Any, list[Any]]:
        """(doc, images) of a doc id."""
        if doc_id not in self._recent:
            doc = self.docs[doc_id]
            self._recent[doc_id] = (doc, [im for im in (self.doc_to_visual(doc) or []) if im is not None])
            if len(self._recent) > self.keep:
                self._recent.popitem(last=False)
        self._recent.move_to_end(doc_id)
        return self._recent[doc_id]


@dataclass
class TaskSample:
    """One generate_until request of an lmms-eval task, as the evaluator would send it; its doc and images
    are decoded from the task's docs when used."""

    task: str
    doc_id: int
    split: str
    context: str
    gen_kwargs: dict[str, Any]
    task_obj: Any
    docs: DecodedDocs = field(repr=False)

    @property
    def doc(self) -> Any:
        return self.docs[self.doc_id][0]

    @property
    def images(self) -> list[Any]:
        return self.docs[self.doc_id][1]

    def score(self, answer: str) -> float:
        return primary_score(self.task_obj, self.doc, answer)

    def request(
        self, budget_ms: float | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, style: str = "auto"
    ) -> Request:
        """This sample as the plugin would serve it: the task's generation kwargs (`max_new_tokens` when they
        set none) and the prompt style for its task name."""
        return Request(
            question=self.context,
            images=tuple(self.images),
            budget_ms=budget_ms,
            gen=generation_config(self.gen_kwargs, max_new_tokens),
            style=task_style(self.task, style),
            task=self.task,
            doc_id=self.doc_id,
            split=self.split,
            question_type=question_type(self.doc),
        )


def question_type(doc: Any) -> str | None:
    """A doc's question type: its `qtype` field (the synthetic suite's tasks have one), else None."""
    value = doc.get("qtype") if isinstance(doc, dict) else None
    return None if value is None else str(value)


def primary_score(task_obj: Any, doc: Any, answer: str) -> float:
    """The task's own `process_results` for one answer, reduced to its first metric (in metric_list order)
    that carries a number: the value itself, or the `score` of a per-sample dict (POPE, MME)."""
    result = task_obj.process_results(doc, [answer])
    names = [m["metric"] for m in task_obj.config.metric_list] + list(result)
    for name in names:
        value = result.get(name)
        if isinstance(value, dict):
            value = value.get("score")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    raise ValueError(f"task {task_obj.config.task}: process_results gave no numeric score ({sorted(result)})")


def load_samples(tasks: Sequence[str], include_path: Sequence[str], limit: int | None, seed: int) -> list[TaskSample]:
    """generate_until requests of the tasks; with `limit`, a seeded random subset of each task's docs."""
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager(include_path=list(include_path), include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):  # hub tasks: index the built-in ones too
        manager = TaskManager(include_path=list(include_path) or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval task(s) {unknown}; local tasks need --include-path tasks")
    samples: list[TaskSample] = []
    leaves = sorted(_leaf_tasks(get_task_dict(list(tasks), manager)), key=lambda nt: (_position(nt[0], tasks), nt[0]))
    for name, task in leaves:
        if task.OUTPUT_TYPE != "generate_until":
            raise ValueError(f"task {name}: output type {task.OUTPUT_TYPE!r}; profiling measures generate_until tasks")
        task.build_all_requests(limit=None, rank=0, world_size=1)
        instances = sorted(task.instances, key=lambda inst: inst.args[3])
        if limit is not None and limit < len(instances):
            instances = sorted(random.Random(f"{seed}/{name}").sample(instances, limit), key=lambda inst: inst.args[3])
        docs = DecodedDocs(task.eval_docs, instances[0].args[2]) if instances else None  # the task's doc_to_visual
        for inst in instances:
            context, gen_kwargs, _, doc_id, task_name, split = inst.args
            samples.append(TaskSample(task_name, int(doc_id), split, context, dict(gen_kwargs), task, docs))
    return samples


def _position(name: str, requested: Sequence[str]) -> int:
    """Tasks asked for by name come in the order asked; members of groups / tags after them."""
    return requested.index(name) if name in requested else len(requested)


def _leaf_tasks(task_dict: dict) -> Iterator[tuple[str, Any]]:
    for name, value in task_dict.items():
        if isinstance(value, dict):
            yield from _leaf_tasks(value)
        else:
            yield str(getattr(value.config, "task", name)), value
