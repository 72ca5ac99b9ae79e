"""What a user touches: the job spec (``spec``) and its plan (``plan``), the command line (``cli``, ``console``),
running a job (``runner``), its report and status (``report``, ``progress``), submission to a cluster
(``submit``), the demo (``demo``), scoring (``evaluate``, ``eval_cli``, ``eval_report``) and training (``train/``)."""
