"""Image restoration: synthetic degradations (noise, blur, downsampling, holes) for training and evaluation."""
