"""Operations on a checkpoint's weights that write a new checkpoint."""
