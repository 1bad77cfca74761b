"""Face detection, landmarks, tracking and cropping: batched torch code that runs on CPU or CUDA."""
