"""Defaults for the embedded synthetic dataset on a CPU (the `bdjax demo` settings).

    bdjax attack --dataset synthetic --model small_cnn --attack badnets --ratio 0.1 \
        --target 0 --seed 0 --out runs/badnets
    bdjax defend --checkpoint runs/badnets --defense ft --spc 10 --trials 5 --seed 0 \
        --out runs/results.jsonl

Expected on a 2-core CPU: attack ~2 minutes (20 epochs of 10,000 images at ~4.5 s each;
clean ACC ~93%, BadNets ASR ~95%), FT over 5 vmapped trials well under a minute.

REFERENCE.md's attack training (100 epochs at lr 0.01) is scaled down to 20 epochs at
lr 0.05 so the small CNN converges within the CPU budget. The defenses keep their
reference settings except where the small CNN needs another value to meet issue 8's bar
(mean ASR at most half of the ASR before, mean clean ACC down by less than 10 points) on
every checkpoint it was measured on: BadNets and Blended 10%, attack seeds 1 and 2, SPC
100, 3 trials each, with ``benchmarks/defense_check.py`` (``--config none`` gives the
reference settings). ACC drop / ASR after, per checkpoint (badnets-1, blended-1,
badnets-2, blended-2), on a 2-core CPU:

- fst: alpha 0.02 and 30 epochs [reference: alpha 0.2, 10 epochs]. The small CNN's head
  has ||W||^2 ~ 60-100, so with 0.2 the inner-product penalty (as low as -alpha ||W||^2)
  outweighs the CE loss: reference settings -46/-45/-42/-46 points (ASR ~0). alpha
  0.02 with 10 epochs still loses 15-19 points (the head is re-learnt from its projected
  random start); 30 epochs: -4.2/-4.5/-4.0/-5.3, ASR .014/.012/.028/.107.
- ft_sam: 20 epochs at batch 128, lr 0.02 (CPU scaling of 100 epochs, batch 256, lr
  0.01) and rho 3 [code: 2]. With rho 2 BadNets seed 1 keeps ASR .468 (bar .471);
  rho 3: -2.7/-5.1/-2.4/-4.9, ASR .33/.03/.21/.10.
- grad_prune: scores with running BatchNorm statistics (``score_batch_stats=False``)
  and fine-tuning capped at 30 epochs. With the reference's batch statistics the first
  filter it prunes on blended-1 (conv1) costs 20 validation points, so nothing is pruned
  and the ASR stays .69; with running statistics it prunes conv3 filters: -0.0/-0.8/
  -1.5/-1.6, ASR .05/.10/.017/.22.
- npd: the reference settings (50 epochs, constant lr 0.01, lambdas 0.4) meet the bar:
  -5.9/-8.2/-5.4/-8.6, ASR .14/.28/.016/.22 (~105 s per trial at SPC 100). Shorter runs
  lose more accuracy: 10 epochs -9..-19, 30 epochs with a cosine -10.3 on blended-2.
- anp: 200 mask iterations [reference: 2,000]. The iterations draw batches of 256 with
  replacement whatever the SPC, so the reference's 2,000 cost ~200 s per trial on 2
  cores (~17 minutes a 5-trial grid cell, 8 cells); 200 meet the bar: -9.1/-6.7/-8.3/
  -7.7, ASR .13/.04/.25/.01 (~50 s per trial while another job ran). Same regime as the
  reference's count: on badnets-1, trial 0, 2,000 iterations give -8.0 and ASR .24,
  200 give -9.8 and ASR .10.
- nad: teacher and student at lr 0.05 [reference: 0.01], the attack training's CPU
  scaling (lr 0.05 for 0.01). At 0.01 the 40 steps of SPC 100 (10 epochs of 4 batches)
  leave the teacher backdoored and the student with it (test fixture: ASR 96% -> 92%);
  at 0.05: -4.2/-3.6/-3.3/-2.7, ASR .44/.36/.38/.40 (~30-50 s per trial). FT alone at
  0.05 for the teacher's 10 epochs keeps the fixture's ASR at ~70%: the distillation
  does the rest.
- nc: one reverse-engineering batch of 100 per epoch (at SPC 10 the reference's one
  pass; at SPC 100, 80 steps instead of 320) and 20 fine-tuning epochs [100]: ~90 s
  per trial at SPC 100 instead of ~550 s (loaded CPU). SPC 100: -0.2/+0.1/-0.5/-0.6,
  ASR .02/.79/.04/.66; the reference: -0.1/0/-0.7/0, ASR .05/.97/.04/.98 (1 trial).
  Both meet the bar on BadNets (the target flagged in every trial) and not on Blended,
  whose full-image trigger NC misses (flagged in 1 of 3 trials here, never at the
  reference settings), as the survey reports.
- sau: 20 epochs at batch 32 and lr 1e-3 [reference: 100 epochs, batch 256, lr 1e-4].
  At SPC 10 the reference's one batch per epoch leaves the backdoor: -3.5/-3.3/-3.8/
  -6.0, ASR .80/.55/.64/.72; at SPC 100, 20 of its epochs leave ASR .68 on badnets-1
  (one trial). With these: SPC 100 -1.9/-4.4/-5.2/-2.1, ASR .13/.10/.12/.32; SPC 10
  -9.8/-9.0/-7.7/-9.4, ASR .31/.11/.33/.27.
- ibau: the authors' settings (``lr 1e-3, amsgrad False, batch_size 100, augment False,
  space pixel``: the paper's repository) [the fork: lr 1e-4 amsgrad, batch 256,
  augmented, a perturbation in normalised units]. The fork's settings barely move the
  small CNN (seed-0 grid: ASR 84-94%) and no learning rate fixes that on badnets-1 and
  blended-1: 1e-3 gives -1.7/-1.4, ASR .66/.49; 1e-3 for 15 rounds -1.0/-0.9, ASR
  .62/.52; 3e-3 -26/-35, ASR .21/.11 (their normalised-space perturbation changes only
  a few percent of the predictions). The authors' settings: -7.9/-4.2/-8.4/-7.7, ASR
  .007/.51/.018/.25: the bar on three of four (blended-1 misses it by 2.4 points).
- fp, bnp, clp, rnp, awm, mmbd, pbe: the reference settings (their grid rows show where
  they fail on the small CNN, as the survey's heavy tails do).
- synthetic images are 32x32 like CIFAR but the dataset has no flips (REFERENCE: flips
  are a CIFAR convention); the runner sets flip=False from the dataset.

Attacks (``bdjax attack --attack X --ratio 0.1 --target 0``, small CNN; the bar of issue
12: ASR >= 90% and clean ACC within 3 points of a clean model trained the same way,
which is 96.7% at 20 epochs, 97.4% at 40, 98.4% at 60, 98.3% at 100; ACC/ASR per attack
seed):

- wanet, bpp: the reference's batches, un-augmented before the poisoning (only the
  post-poisoning crop/rotation/flip; bdjax used to crop and flip first as well, which
  cost BPP ~5-8 ASR points: 100 epochs gave 98.9/90.2, 98.7/87.9, 98.8/83.7).
- wanet: 60 epochs [the others: 20], the small CNN learns its warp (k 4, s 0.5) and noise
  mode slowly: 98.0/99.2, 98.1/95.9, 98.4/99.4 (seeds 0, 1, 2).
- bpp, lf: 100 epochs, the reference's count (the cosine stretched over the run, same
  peak lr). BPP 98.5/92.6, 98.7/92.3, 99.0/92.2 (seeds 0, 1, 2). LF 97.1/89.8,
  97.0/94.0, 97.2/91.6 (seeds 0, 1, 2; its clean model trains the same 100 epochs); 20
  epochs 91.3/56.3, 40 94.8/80.2, 60 95.4/86.7 (seed 0).
- iab: mask_epochs 5 [25], the CPU scaling of the attack's training (stage 1 costs ~70
  s an epoch on 2 cores); 20 epochs 95.2/62.7 (seed 0). With G's lr following the
  classifier's cosine but cross sources from the same batch: 20 epochs 95.3/62.6, 60
  98.3/73.4; with G's lr constant (the reference's literal setting), same-batch
  sources: 20 epochs 95.2/54.5, 60 98.2/69.9, 100 98.2/72.9. Cross sources from a
  second shuffle (the reference's second loader, now the only way) change nothing at
  20 epochs (62.7 against 62.6). Seed 1, this code: 95.0/66.0 with G following,
  95.1/64.2 with G constant. The reference's 25 mask epochs change nothing (60
  epochs, G constant: 98.2/71.8), nor do wider classifiers (widths x2 and x4, 20
  epochs, G constant: 97.1/72.0, 97.5/70.2), nor does the reference's classifier
  (PreAct-ResNet18, 11M parameters, 15 epochs, G following: 98.4/74.2, ~65 minutes):
  every classifier levels off at 70-74.
  None learns the generator's pattern; they key on the mask's position: stamped with
  its own mask and another image's pattern an image goes to the target 73% of the time,
  with its own pattern and another image's mask 33% (G's patterns are 98% saturated
  pixels, 0 or 1, and differ between images more than the images do). Without cross samples
  (cross_ratio 0, 20 epochs) it reaches 95.3/97.0: the cross samples' consistency check
  is what the small CNN does not learn. The reference classifier's
  constant lr 0.01 (20 epochs) is worse, 82.1/65.9; G's eval-mode statistics are not
  the cause (its batch statistics give ASR 68.1 on that model).
- lc: the robust model 10 epochs of PGD with 3 steps [the attack's epochs, 10 steps]
  (~5 minutes instead of ~1 hour). At ratio 0.1 LC poisons every target-class image
  (REFERENCE: clean-label attacks draw from the target class), so no clean image of
  class 0 is left and class 0's test accuracy is 0.5% (the other classes 94-99%):
  86.6/87.3, a loss the reference's ratio makes on any balanced 10-class set; ratio
  0.05: 94.6/68.5. With the full robust model (20 epochs of PGD-10, ~15 minutes): ratio
  0.05 93.4/85.7, ratio 0.1 86.7/76.1 (seed 0). BackdoorBench's own LC at 10% loses as much (FT-SAM's supplementary,
  CIFAR-10: 84.6 on PreAct-ResNet18 against 91.8-94.0 for the other attacks of Table 8;
  83.4 on VGG19-BN against 88.7-91.6, Table 2); at 5% it keeps 93.5 (Table 6).
- ssba: the encoder 100 epochs [20], the reference's step count (20 epochs of CIFAR-10's
  50,000 images at batch 64 are ~15,600 steps; 100 epochs of 10,000 are 15,700): bit
  accuracy 0.947, PSNR 26.2 dB (~45 minutes on 2 cores, 90 beside another job; once per
  dataset: every seed, target and model reuses it). 94.1/100, 94.5/99.8, 95.6/99.9
  (seeds 0, 1, 2). With 20 epochs (3,140 steps) the bit accuracy never reaches the 0.9
  that switches the image loss on, which `bdjax attack` reports.
- trojan: the reference settings, 94.9/97.6 (seed 0).

``smoke=True`` shrinks everything for tests (seconds, not minutes).
"""


# Attack training: a cosine over the whole run, per batch (REFERENCE's T_max = 100 epochs
# would leave the lr near its peak after 20 epochs).
TRAIN = {"epochs": 20, "batch_size": 128, "lr": 0.05, "schedule_unit": "batch", "t_max": 0}


def get_config(smoke: bool = False) -> dict:
    if smoke:
        return {
            "dataset": "synthetic", "model": "small_cnn",
            "dataset_args": {"n_train": 2000, "n_test": 500},
            "train": {**TRAIN, "epochs": 3},
            "defenses": {"ft": {"epochs": 5}, "fst": {"alpha": 0.02, "epochs": 2}},
        }
    return {
        "dataset": "synthetic", "model": "small_cnn",
        "dataset_args": {},
        "train": TRAIN,
        "attack_train": {"wanet": {"epochs": 60}, "bpp": {"epochs": 100},
                         "lf": {"epochs": 100}},
        "attacks": {"iab": {"mask_epochs": 5}, "ssba": {"epochs": 100},
                    "lc": {"robust_epochs": 10, "robust_steps": 3}},
        "defenses": {
            "fst": {"alpha": 0.02, "epochs": 30},
            "ft_sam": {"epochs": 20, "batch_size": 128, "lr": 0.02, "rho": 3.0},
            "grad_prune": {"epochs": 30, "score_batch_stats": False},
            "anp": {"iterations": 200},
            "nad": {"lr": 0.05, "student_lr": 0.05},
            "nc": {"nc_batch_size": 100, "nc_batches": 1, "epochs": 20},
            "sau": {"epochs": 20, "lr": 1e-3, "batch_size": 32},
            "ibau": {"lr": 1e-3, "amsgrad": False, "batch_size": 100, "augment": False,
                     "space": "pixel"},
        },
    }
