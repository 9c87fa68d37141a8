"""The one distributed seam: process groups, Accelerate/DeepSpeed engines, collectives, placement."""
