"""The demo models: the emoji data set (from installed packages), the 4x tokenizer, training in resumable calls, sample grids."""
