"""`kleinstyle plan`: the TrainingPlan the operator would make for a StyleLoRA YAML and a board of N images.

The spec is read with the resource model, the way the operator reads it: its defaults, bounds and enums, with an
error naming the field (`spec.training.rank: ...`). The CEL rules are the API server's; `kubectl apply
--dry-run=server` checks those.
"""

from __future__ import annotations

import argparse
import sys

import yaml
from kleinstyle.contract.aitoolkit import aitoolkit_config
from kleinstyle.contract.plan import plan_training
from pydantic import ValidationError

from .api.common import field_errors
from .api.stylelora import StyleLoRASpec


def plan(args: argparse.Namespace) -> int:
    with open(args.stylelora, encoding="utf-8") as handle:
        docs = [d for d in yaml.safe_load_all(handle) if isinstance(d, dict) and d.get("kind") == "StyleLoRA"]
    if len(docs) != 1:
        print(f"{args.stylelora}: expected one StyleLoRA, found {len(docs)}", file=sys.stderr)
        return 2
    try:
        spec = StyleLoRASpec.model_validate(docs[0].get("spec") or {})
        result = plan_training(args.images, spec.model_dump(mode="json", exclude_none=True))
    except ValidationError as exc:
        print("\n".join(field_errors(exc)), file=sys.stderr)
        return 2
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.output == "json":
        print(result.model_dump_json(indent=2))
    elif args.output == "yaml":
        print(yaml.safe_dump(result.model_dump(mode="json"), sort_keys=False), end="")
    else:
        config = aitoolkit_config(
            result,
            name=(docs[0].get("metadata") or {}).get("name", "stylelora"),
            dataset_dir=args.dataset,
            training_folder=args.training_folder,
            trigger_word=args.trigger or spec.board_ref.name,
            model=spec.model.name,
            model_path=args.model_path,
        )
        print(yaml.safe_dump(config, sort_keys=False), end="")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
