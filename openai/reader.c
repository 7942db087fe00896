/*
 * reader.c: HTTP/1.1 requests out of a connection's byte stream (see openai_int.h).
 *
 * http-parser does the protocol (request line, headers, Content-Length and chunked bodies,
 * keep-alive); this file keeps the parts the front needs and enforces its limits. The parser
 * is paused at the end of each request, so that pipelined bytes wait until the answer to the
 * first is written.
 */
#include <ctype.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "openai_int.h"

static oai_reader_t *reader_of(http_parser *p)
{
    return p->data;
}

static int fail(oai_reader_t *r, int status)
{
    if (r->error == 0)
        r->error = status;
    return 1; // stops http_parser_execute
}

static int on_message_begin(http_parser *p)
{
    oai_reader_t *r = reader_of(p);
    r->head_bytes = 0;
    r->target_len = 0;
    r->target[0] = '\0';
    r->body_len = 0;
    r->expect_continue = false;
    r->field_len = 0;
    r->field_long = false;
    r->in_value = false;
    r->in_value_expect = r->in_value_auth = false;
    r->auth_len = 0;
    r->auth[0] = '\0';
    r->auth_long = false;
    return 0;
}

static int count_head(oai_reader_t *r, size_t n)
{
    r->head_bytes += n;
    return r->head_bytes > OAI_MAX_HEAD ? fail(r, 431) : 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    oai_reader_t *r = reader_of(p);
    if (count_head(r, n))
        return 1;
    if (n > OAI_MAX_TARGET - r->target_len)
        return fail(r, 414);
    memcpy(r->target + r->target_len, at, n);
    r->target_len += n;
    r->target[r->target_len] = '\0';
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n)
{
    oai_reader_t *r = reader_of(p);
    if (count_head(r, n))
        return 1;
    if (r->in_value) { // a new field begins
        r->in_value = false;
        r->field_len = 0;
        r->field_long = false;
    }
    for (size_t i = 0; i < n && !r->field_long; i++) {
        if (r->field_len + 1 >= sizeof(r->field))
            r->field_long = true;
        else
            r->field[r->field_len++] = (char)tolower((unsigned char)at[i]);
    }
    r->field[r->field_len] = '\0';
    return 0;
}

static int on_header_value(http_parser *p, const char *at, size_t n)
{
    oai_reader_t *r = reader_of(p);
    if (count_head(r, n))
        return 1;
    if (!r->in_value) {
        r->in_value = true;
        r->in_value_expect = !r->field_long && strcmp(r->field, "expect") == 0;
        r->in_value_auth = !r->field_long && strcmp(r->field, "authorization") == 0;
        if (r->in_value_auth && r->auth_len > 0)
            r->auth_long = true; // a second Authorization header: refuse rather than pick
    }
    // "100-continue" is the only expectation defined (RFC 9110 10.1.1).
    for (size_t i = 0; r->in_value_expect && i + 12 <= n; i++)
        if (strncasecmp(at + i, "100-continue", 12) == 0)
            r->expect_continue = true;
    if (r->in_value_auth) {
        if (n > OAI_MAX_AUTH - r->auth_len) {
            r->auth_long = true;
        } else {
            memcpy(r->auth + r->auth_len, at, n);
            r->auth_len += n;
            r->auth[r->auth_len] = '\0';
        }
    }
    return 0;
}

static int on_headers_complete(http_parser *p)
{
    oai_reader_t *r = reader_of(p);
    const char *m = http_method_str((enum http_method)p->method);
    snprintf(r->method, sizeof(r->method), "%s", m);
    if (p->http_major != 1)
        return fail(r, 505);
    if (p->content_length != ULLONG_MAX && p->content_length > r->max_body)
        return fail(r, 413);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    oai_reader_t *r = reader_of(p);
    if (n > r->max_body - r->body_len)
        return fail(r, 413);
    if (r->body_len + n + 1 > r->body_cap) {
        size_t cap = FY_MAX(r->body_cap * 2, r->body_len + n + 1);
        cap = FY_MIN(cap, r->max_body + 1);
        char *b = realloc(r->body, cap);
        if (b == NULL)
            return fail(r, 503);
        r->body = b;
        r->body_cap = cap;
    }
    memcpy(r->body + r->body_len, at, n);
    r->body_len += n;
    r->body[r->body_len] = '\0';
    return 0;
}

static int on_message_complete(http_parser *p)
{
    oai_reader_t *r = reader_of(p);
    if (r->body == NULL) {
        r->body = malloc(1);
        if (r->body == NULL)
            return fail(r, 503);
        r->body_cap = 1;
    }
    r->body[r->body_len] = '\0';
    r->keep_alive = http_should_keep_alive(p) != 0;
    r->complete = true;
    http_parser_pause(p, 1);
    return 0;
}

static const http_parser_settings k_settings = {
    .on_message_begin = on_message_begin,
    .on_url = on_url,
    .on_header_field = on_header_field,
    .on_header_value = on_header_value,
    .on_headers_complete = on_headers_complete,
    .on_body = on_body,
    .on_message_complete = on_message_complete,
};

void oai_reader_init(oai_reader_t *r, size_t max_body)
{
    memset(r, 0, sizeof(*r));
    http_parser_init(&r->parser, HTTP_REQUEST);
    r->parser.data = r;
    r->max_body = max_body;
}

void oai_reader_cleanup(oai_reader_t *r)
{
    if (r == NULL)
        return;
    free(r->body);
    r->body = NULL;
    r->body_cap = r->body_len = 0;
}

size_t oai_reader_feed(oai_reader_t *r, const char *data, size_t len)
{
    if (r->complete || r->error || len == 0)
        return 0;
    size_t n = http_parser_execute(&r->parser, &k_settings, data, len);
    enum http_errno e = HTTP_PARSER_ERRNO(&r->parser);
    if (r->complete)
        return n; // paused right after the request's last byte
    if (e == HPE_HEADER_OVERFLOW)
        fail(r, 431);
    else if (e != HPE_OK)
        fail(r, 400); // a callback's own status wins (fail keeps the first)
    return n;
}

void oai_reader_next(oai_reader_t *r)
{
    r->complete = false;
    r->body_len = 0;
    if (r->body_cap > 65536) {
        // Do not keep a large body's buffer for the connection's lifetime.
        free(r->body);
        r->body = NULL;
        r->body_cap = 0;
    }
    http_parser_pause(&r->parser, 0);
}

const char *oai_reader_path(const oai_reader_t *r, size_t *len_p)
{
    const char *q = memchr(r->target, '?', r->target_len);
    *len_p = q ? (size_t)(q - r->target) : r->target_len;
    return r->target;
}
