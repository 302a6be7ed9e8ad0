#!/usr/bin/env bash
# Nightly embedding and tagging of a photo library, for cron. Only new and changed photos are processed;
# a run killed half-way (reboot, OOM) is finished by the next one; two overlapping runs never both write.
#
#   crontab -e
#   15 2 * * *  /path/to/siglip/examples/nightly.sh /srv/photos /srv/photo-index >> /var/log/siglip.log 2>&1
set -euo pipefail

photos=${1:?usage: nightly.sh PHOTOS_DIR INDEX_DIR}
index=${2:?usage: nightly.sh PHOTOS_DIR INDEX_DIR}
vocab=${SIGLIP_VOCAB:-$(dirname "$0")/ram_tag_list.txt}
mkdir -p "$index"

# cron's PATH is short: use the venv's siglip if there is one beside this checkout.
siglip=$(command -v siglip || echo "$(dirname "$0")/../.venv/bin/siglip")

echo "== $(date -Is) siglip nightly on $photos"
# Exit 1 (the output is locked by a run still going, the model cannot be loaded, the photo share is not
# mounted: its folder is missing, or empty so --prune refuses to empty the index) is worth a mail from cron;
# photos that cannot be read are error rows, not failures. --prune only ever removes rows under "$photos", and never most of them.
"$siglip" embed "$photos" -o "$index/embeddings" --prune --quiet
"$siglip" tag "$photos" --vocab "$vocab" -o "$index/tags" --prune --quiet
echo "== $(date -Is) done"
