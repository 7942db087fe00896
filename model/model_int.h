/*
 * model_int.h: what the model module's files share and nobody else sees.
 */
#ifndef FERRY_MODEL_INT_H
#define FERRY_MODEL_INT_H

#include "model.h"

/* Writes one token's K and V (FP32, head_dim each) of one (layer, kv head) at position pos
 * (which must have a reserved page). Thread: calls on different (layer, head, pos) may run in
 * parallel. */
void mdl_kv_seq_write(mdl_kv_seq_t *seq, int layer, int head, int64_t pos, const float *k,
                      const float *v);

/* Unicode classes the pre-tokenizers need (unicode.c). */
bool mdl_uni_is_letter(uint32_t cp);
bool mdl_uni_is_number(uint32_t cp);
bool mdl_uni_is_space(uint32_t cp);
/* Simple lowercase mapping for the case-insensitive contractions (ASCII is enough there). */

#endif /* FERRY_MODEL_INT_H */
