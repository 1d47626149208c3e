"""`fssam eval`: the FSSAM reference's few-shot benchmark protocol (PASCAL-5i, COCO-20i) on any backend.

datasets: layouts, fold classes, list files (read, or built by the reference's rule). episodes: the reference
loader's episode sequence, episodes.json. inputs: one episode's tensors from its files. metrics: intersection /
union, mIoU, FB-IoU as the reference accumulates them. run: the loop, partial results, resume, overlays.
report: JSON + Markdown. cli: the subcommand. synthetic: a small VOC-layout dataset for tests.
"""
