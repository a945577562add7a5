"""What the cheap ascents and RWP were measured to cost and what the study says of their robust accuracy.

Generated: the block below is written by ``python scripts/docs_numbers.py`` from the committed cost JSON
(``scripts/study.py cost``) and the study's per-seed records (docs/study/records); ``make test`` fails when
it differs from them, so a number here is never typed by hand. ``awpfast-train --help`` prints these
sentences under ``--awp-ascent``, ``--awp-every``, ``--awp-ascent-fraction`` and ``--awp-rule``.
"""

# numbers: ascent-help (docs/study_cost_preact18.json, docs/study_cost_small-cnn.json, docs/study/records)
MEASURED = {
    'attack': (
        "costs 0.42 of exact AWP's extra time over AT [quartiles 0.12, 0.44] "
        '(PreActResNet-18, CPU, 1 thread, 7 paired rounds); robust accuracy against exact AWP '
        '(the study): undecided so far (6 of 10 seeds); last-3 PGD-20 +0.3 [95 % CI -38.4, '
        '+39.0], AutoAttack +0.4 [95 % CI -36.9, +37.7] points, n = 6 paired seeds, digits '
        '8x8; 1 of 6 runs ended at chance accuracy (seed 0 from epoch 15)'),
    'attack-evalbn': (
        "costs 0.24 of exact AWP's extra time over AT [quartiles 0.09, 0.58] "
        "(PreActResNet-18, CPU, 1 thread, 7 paired rounds; the eval-mode attack's own cost "
        'included); robust accuracy against exact AWP with the eval-mode attack (the study): '
        'loses so far (6 of 10 seeds); last-3 PGD-20 -3.9 [95 % CI -5.0, -2.9], AutoAttack '
        '-3.6 [95 % CI -4.9, -2.3] points, n = 6 paired seeds, digits 8x8'),
    'momentum': (
        "no extra time over AT that the timing resolves (median -0.21 of exact AWP's extra, "
        'quartiles -0.34, 0.10) (PreActResNet-18, CPU, 1 thread, 7 paired rounds); robust '
        'accuracy against exact AWP (the study): pilot, 3 seeds: more than 2 points below '
        'exact AWP, not promoted (the rule at n = 3: loses); last-3 PGD-20 -7.8 [95 % CI '
        '-8.2, -7.3], AutoAttack -8.9 [95 % CI -12.7, -5.0] points, n = 3 paired seeds, '
        'digits 8x8'),
    'every2': (
        "costs 0.64 of exact AWP's extra time over AT [quartiles 0.10, 0.69] "
        '(PreActResNet-18, CPU, 1 thread, 7 paired rounds); robust accuracy against exact AWP '
        '(the study): undecided so far (6 of 10 seeds; about 29 would decide); last-3 PGD-20 '
        '+7.2 [95 % CI -18.5, +32.9], AutoAttack +6.3 [95 % CI -17.7, +30.2] points, n = 6 '
        'paired seeds, digits 8x8'),
    'sub0.25': (
        "costs 0.34 of exact AWP's extra time over AT [quartiles 0.04, 0.39] "
        '(PreActResNet-18, CPU, 1 thread, 7 paired rounds); robust accuracy against exact AWP '
        '(the study): undecided so far (6 of 10 seeds; about 40 would decide); last-3 PGD-20 '
        '+6.0 [95 % CI -18.7, +30.7], AutoAttack +5.0 [95 % CI -18.4, +28.4] points, n = 6 '
        'paired seeds, digits 8x8'),
    'rwp': (
        "costs 12.32 of exact AWP's extra time over AT [quartiles 9.95, 13.34] (the study's "
        'SmallCNN, CPU, 1 thread, 21 paired rounds); robust accuracy against exact AWP '
        'reported, not concluded: last-3 PGD-20 -1.3 [95 % CI -3.2, +0.6], AutoAttack -1.9 '
        '[95 % CI -2.2, -1.6] points, n = 3 paired seeds, digits 8x8'),
}
# /numbers


def measured(arm: str) -> str:
    """The generated sentence for ``arm`` (a key of :data:`MEASURED`), escaped for argparse's help."""
    return MEASURED[arm].replace("%", "%%")
