"""Frozen-encoder evaluations as the UltraDINO paper reports them (`m2dino eval`).

  frozen   an encoder from any checkpoint (ours, HF, DINOv2 .pth) or random weights of the same architecture,
           and its features over a labelled split (eval transforms of the data pipeline)
  probe    k-NN (DINO's weighted cosine vote) and the linear probe (multinomial logistic regression by
           L-BFGS) on [CLS || mean patch]; classification metrics with macro F1 as the headline
  fewshot  few-shot segmentation: an UperNet-lite head over blocks [3, 5, 7, 11] of the frozen encoder, CE +
           Dice, N training images over several random splits, Dice pooled over the test set (mDice, mfDice)
  suite    the datasets (simulator tasks, FETAL_PLANES_DB, JNU-IFM, FASS) and the `ssl` run of all three
"""
