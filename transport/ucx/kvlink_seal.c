/*
 * kvlink_seal.c: sealed KV frames, AES-256-GCM under a key of one request.
 *
 * The KV plane carries a prompt's KV cache between workers over UCX, which neither encrypts
 * nor authenticates. When the router hands both workers a fresh key for a request (over the
 * control plane, which TLS and the API key protect), the prefill worker seals each frame and
 * the decode worker opens it before parsing: a frame read on the wire shows nothing of the
 * prompt, and a frame forged, altered, replayed into another request or moved to another
 * layer fails to open. Layout (KVLINK_SEAL_OVERHEAD bytes more than the frame):
 *
 *   "FYSL" | nonce (12 random bytes) | ciphertext (the frame's length) | tag (16)
 *
 * with the magic, the request id and the layer (little-endian) as additional authenticated
 * data. The nonce is drawn per frame, so a frame sent twice under one key (a retried layer)
 * never reuses one.
 */
#include <string.h>

#include <openssl/evp.h>
#include <openssl/rand.h>

#include "kvlink.h"

#define SEAL_MAGIC "FYSL"
#define NONCE_LEN  12
#define TAG_LEN    16

/* The additional data: magic, request id, layer. */
static void seal_aad(uint64_t request_id, uint32_t layer, uint8_t aad[16])
{
    memcpy(aad, SEAL_MAGIC, 4);
    for (int i = 0; i < 8; i++)
        aad[4 + i] = (uint8_t)(request_id >> (8 * i));
    for (int i = 0; i < 4; i++)
        aad[12 + i] = (uint8_t)(layer >> (8 * i));
}

/* Runs AES-256-GCM over len bytes of in into out (may be in), encrypting or decrypting; tag is
 * written when encrypting and checked when decrypting. */
static fy_status_t gcm(bool encrypt, const uint8_t *key, const uint8_t *nonce, const uint8_t *aad,
                       const uint8_t *in, size_t len, uint8_t *out, uint8_t *tag)
{
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (c == NULL)
        return FY_ERR_NO_MEMORY;
    int n = 0;
    bool ok = EVP_CipherInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL, encrypt) == 1 &&
              EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, NONCE_LEN, NULL) == 1 &&
              EVP_CipherInit_ex(c, NULL, NULL, key, nonce, encrypt) == 1 &&
              EVP_CipherUpdate(c, NULL, &n, aad, 16) == 1;
    // EVP takes int lengths: the frame goes in pieces.
    for (size_t off = 0; ok && off < len;) {
        const int piece = (int)FY_MIN(len - off, (size_t)1 << 30);
        ok = EVP_CipherUpdate(c, out + off, &n, in + off, piece) == 1 && n == piece;
        off += (size_t)piece;
    }
    if (ok && !encrypt)
        ok = EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, TAG_LEN, tag) == 1;
    fy_status_t st = FY_OK;
    if (ok && EVP_CipherFinal_ex(c, out + len, &n) != 1)
        st = encrypt ? FY_ERR_INTERNAL : FY_ERR_CORRUPT; // decrypting: the tag did not match
    else if (!ok)
        st = FY_ERR_INTERNAL;
    if (st == FY_OK && encrypt && EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, TAG_LEN, tag) != 1)
        st = FY_ERR_INTERNAL;
    EVP_CIPHER_CTX_free(c);
    return st;
}

fy_status_t kvlink_seal(const uint8_t key[KVLINK_SEAL_KEY_BYTES], uint64_t request_id,
                        uint32_t layer, const void *frame, size_t len, uint8_t *out)
{
    if (key == NULL || (frame == NULL && len > 0) || out == NULL)
        return FY_ERR_INVALID_ARG;
    uint8_t aad[16];
    seal_aad(request_id, layer, aad);
    memcpy(out, SEAL_MAGIC, 4);
    if (RAND_bytes(out + 4, NONCE_LEN) != 1)
        return FY_ERR_INTERNAL;
    return gcm(true, key, out + 4, aad, frame, len, out + 4 + NONCE_LEN, out + 4 + NONCE_LEN + len);
}

fy_status_t kvlink_unseal(const uint8_t key[KVLINK_SEAL_KEY_BYTES], uint64_t request_id,
                          uint32_t layer, uint8_t *sealed, size_t len, uint8_t **frame_p,
                          size_t *frame_len_p)
{
    if (key == NULL || sealed == NULL)
        return FY_ERR_INVALID_ARG;
    if (len < KVLINK_SEAL_OVERHEAD || memcmp(sealed, SEAL_MAGIC, 4) != 0)
        return FY_ERR_CORRUPT; // not a sealed frame
    const size_t n = len - KVLINK_SEAL_OVERHEAD;
    uint8_t aad[16];
    seal_aad(request_id, layer, aad);
    uint8_t *body = sealed + 4 + NONCE_LEN;
    fy_status_t st = gcm(false, key, sealed + 4, aad, body, n, body, body + n);
    if (st != FY_OK)
        return st;
    *frame_p = body;
    *frame_len_p = n;
    return FY_OK;
}
