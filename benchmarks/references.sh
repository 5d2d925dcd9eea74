#!/usr/bin/env bash
# The reference models measured here: first what the committed results lack (MedViT on PneumoniaMNIST, ResNet-18
# (28) on RetinaMNIST), then the runs already committed. Every step uses --reuse: finished
# runs are read back and an interrupted one resumes from its last epoch, so running this again continues it.
# Run it from a worktree of a fixed commit (DEVELOPERS.md), then tabulate everything that finished:
#   MEDMIX_DATA=~/medmnist nohup benchmarks/references.sh > runs/references.out 2>&1 &
#   python benchmarks/medmnist_table.py --table-only --keep-committed --runs hybrid_mixer_small medvit_small:medvit_paper \
#       resnet18_28:medmnist_official resnet18_28:medmnist_official_aug
#   python benchmarks/ordinal_sweep.py --table-only --keep-committed --runs hybrid_mixer_small medvit_small:medvit_paper
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src
T="python benchmarks/medmnist_table.py --reuse"
# not in the committed results yet: first
$T --datasets pneumoniamnist --runs medvit_small:medvit_paper --seeds 0
$T --datasets pneumoniamnist --runs medvit_small:medvit_paper --seeds 1 2
$T --datasets retinamnist --runs resnet18_28:medmnist_official
# committed already (tabulate with --keep-committed to keep them without rerunning); these re-measure them
$T --datasets breastmnist --runs medvit_small:medvit_paper
$T --datasets breastmnist --runs resnet18_28:medmnist_official
$T --datasets breastmnist --runs resnet18_28:medmnist_official_aug
$T --runs hybrid_mixer_small
python benchmarks/ordinal_sweep.py --reuse --runs medvit_small:medvit_paper --alphas 0 0.2 --no-printed
# the table's RetinaMNIST MedViT rows are the sweep's alpha 0 runs: alpha 0 is cross-entropy exactly, with the same
# recipe, seeds and selection (best epoch by val ACC), so they are linked, not trained twice
mkdir -p runs/bench/medmnist_table
for s in 0 1 2; do
    ln -sfn ../ordinal_sweep/medvit_small-medvit_paper/peaked-a0.0-s$s \
        runs/bench/medmnist_table/retinamnist-medvit_small-medvit_paper-s$s
done
$T --datasets retinamnist --runs medvit_small:medvit_paper
echo "references: done"
