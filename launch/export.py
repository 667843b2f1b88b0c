"""Convert a ds_dpo checkpoint into a Hugging Face model directory, on CPU, without a GPU or a launcher.

python launch/export.py OUTPUT_DIR/checkpoints/step-500 exported/            # full model or LoRA adapter
python launch/export.py OUTPUT_DIR/checkpoints/step-500 exported/ --merge    # LoRA: also exported/merged
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from ds_dpo.training.export import export_checkpoint  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint directory, OUTPUT_DIR/checkpoints/step-N")
    parser.add_argument("output_dir", help="where to write the Hugging Face model")
    parser.add_argument("--merge", action="store_true", help="with LoRA, also write the merged model to merged/")
    args = parser.parse_args()
    export_checkpoint(args.checkpoint, args.output_dir, merge=args.merge)
    print(f"exported {args.checkpoint} to {args.output_dir}")
