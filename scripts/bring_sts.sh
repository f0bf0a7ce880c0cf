#!/usr/bin/env bash
# Bring TCIA's soft-tissue sarcoma cases with expert tumour masks (the IBSI validation set, CC-BY 3.0) and import
# them as four studies folders, split by case number (scripts/sts_split/): studies/sts_{ct,mr}_{train,test}.
#   bash scripts/bring_sts.sh                 # clones github.com/theibsi/data_sets into data/ibsi_data_sets
#   bash scripts/bring_sts.sh /path/to/nifti  # a copy already here: the folder holding STS_001/ ... STS_051/
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source=${1:-}
if [ -z "$source" ]; then
    [ -d data/ibsi_data_sets ] || git clone --depth 1 https://github.com/theibsi/data_sets data/ibsi_data_sets
    source=data/ibsi_data_sets/ibsi_validation/nifti
fi
for modality in CT:ct MR_T1:mr; do
    file=${modality%%:*} name=${modality##*:}
    for part in train test; do
        .venv/bin/python scripts/import_dataset.py "$source" --layout cases --image "{case}/${file}_image.nii.gz" \
            --label "{case}/${file}_mask.nii.gz" --cases "@scripts/sts_split/$part.txt" --out "studies/sts_${name}_${part}"
    done
done
