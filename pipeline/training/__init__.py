"""Training data, read the way the inference path reads images: Zarr datasets of image and label pyramids
(``datasets``, built by ``dataset_import`` from pairs matched by ``dataset_pairs``) and the random crops each
training task draws from them (``crops``; FCtL's context views: ``crops_fctl``; MagNet's refiner pairs:
``crops_refiner``). ``jobs.train`` trains on them; the inference path never imports this package."""
