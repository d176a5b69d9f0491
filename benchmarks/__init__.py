"""benchmarks: the main job. Reports against bitsandbytes/peft, the fine-tune demo, the GPU suite.

The only package that may import bitsandbytes, peft or transformers, and only when installed.
"""
