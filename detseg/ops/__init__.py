"""Small shared pieces the methods compose: upsampling layers, box coding, anchors, proposals (one file each)."""
