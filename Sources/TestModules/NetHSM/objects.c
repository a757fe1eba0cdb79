// NetHSM test module: object attributes — building objects from templates, reading and
// matching attributes, and the few changes C_SetAttributeValue allows.
//
// Secret keys (CKO_SECRET_KEY, CKK_GENERIC_SECRET): CKA_CLASS, CKA_KEY_TYPE, CKA_TOKEN,
// CKA_PRIVATE, CKA_MODIFIABLE, CKA_LABEL, CKA_ID, CKA_VALUE, CKA_VALUE_LEN, CKA_SENSITIVE,
// CKA_EXTRACTABLE, CKA_SIGN, CKA_VERIFY, CKA_ALWAYS_AUTHENTICATE, CKA_LOCAL,
// CKA_ALWAYS_SENSITIVE, CKA_NEVER_EXTRACTABLE, CKA_CHECK_VALUE, and the usage flags CKA_ENCRYPT,
// CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_DERIVE (default false; stored and reported only, since
// no mechanism of this module uses them — accepted because consumers such as pkcs11-tool put
// them in their secret-key templates).
// Data objects (CKO_DATA): CKA_CLASS, CKA_TOKEN, CKA_PRIVATE, CKA_MODIFIABLE, CKA_LABEL,
// CKA_APPLICATION, CKA_VALUE.
// Anything else is CKR_ATTRIBUTE_TYPE_INVALID (in particular there is no CKA_UNIQUE_ID).
//
// CKA_CHECK_VALUE is the first 3 bytes of SHA-256 of CKA_VALUE (PKCS#11 2.40 says SHA-1 for
// generic secret keys; this module has no SHA-1 and the value only has to be stable).
#include "nethsm_internal.h"

#include <string.h>

static int is_key(const struct nh_object *o) { return o->klass == CKO_SECRET_KEY; }

// Is the attribute defined for this object's class?
static int defined_for(const struct nh_object *o, CK_ATTRIBUTE_TYPE type) {
    switch (type) {
    case CKA_CLASS: case CKA_TOKEN: case CKA_PRIVATE: case CKA_MODIFIABLE: case CKA_LABEL: case CKA_VALUE:
        return 1;
    case CKA_APPLICATION:
        return o->klass == CKO_DATA;
    case CKA_KEY_TYPE: case CKA_ID: case CKA_VALUE_LEN: case CKA_SENSITIVE: case CKA_EXTRACTABLE:
    case CKA_SIGN: case CKA_VERIFY: case CKA_ALWAYS_AUTHENTICATE: case CKA_LOCAL:
    case CKA_ALWAYS_SENSITIVE: case CKA_NEVER_EXTRACTABLE: case CKA_CHECK_VALUE:
    case CKA_ENCRYPT: case CKA_DECRYPT: case CKA_WRAP: case CKA_UNWRAP: case CKA_DERIVE:
        return is_key(o);
    default:
        return 0;
    }
}

static int is_bool_attribute(CK_ATTRIBUTE_TYPE type) {
    switch (type) {
    case CKA_TOKEN: case CKA_PRIVATE: case CKA_MODIFIABLE: case CKA_SENSITIVE: case CKA_EXTRACTABLE:
    case CKA_SIGN: case CKA_VERIFY: case CKA_ALWAYS_AUTHENTICATE: case CKA_LOCAL:
    case CKA_ALWAYS_SENSITIVE: case CKA_NEVER_EXTRACTABLE:
    case CKA_ENCRYPT: case CKA_DECRYPT: case CKA_WRAP: case CKA_UNWRAP: case CKA_DERIVE:
        return 1;
    default:
        return 0;
    }
}

static uint8_t *bool_field(struct nh_object *o, CK_ATTRIBUTE_TYPE type) {
    switch (type) {
    case CKA_TOKEN: return &o->token;
    case CKA_PRIVATE: return &o->private_;
    case CKA_MODIFIABLE: return &o->modifiable;
    case CKA_SENSITIVE: return &o->sensitive;
    case CKA_EXTRACTABLE: return &o->extractable;
    case CKA_SIGN: return &o->sign;
    case CKA_VERIFY: return &o->verify;
    case CKA_ALWAYS_AUTHENTICATE: return &o->always_authenticate;
    case CKA_LOCAL: return &o->local;
    case CKA_ALWAYS_SENSITIVE: return &o->always_sensitive;
    case CKA_NEVER_EXTRACTABLE: return &o->never_extractable;
    case CKA_ENCRYPT: return &o->encrypt;
    case CKA_DECRYPT: return &o->decrypt;
    case CKA_WRAP: return &o->wrap;
    case CKA_UNWRAP: return &o->unwrap;
    case CKA_DERIVE: return &o->derive;
    default: return NULL;
    }
}

static CK_ULONG read_ulong(const CK_ATTRIBUTE *a) {
    CK_ULONG v;
    memcpy(&v, a->pValue, sizeof v);
    return v;
}

static void check_value(const struct nh_object *o, uint8_t out[3]) {
    uint8_t digest[32];
    nh_sha256(o->value, o->value_len, digest);
    memcpy(out, digest, 3);
}

CK_RV nh_attribute_read(const struct nh_object *o, CK_ATTRIBUTE_TYPE type, const void **value, CK_ULONG *len,
                        uint8_t scratch[sizeof(CK_ULONG)]) {
    if (!defined_for(o, type)) return CKR_ATTRIBUTE_TYPE_INVALID;
    if (is_bool_attribute(type)) {
        scratch[0] = *bool_field((struct nh_object *)o, type) ? CK_TRUE : CK_FALSE;
        *value = scratch;
        *len = sizeof(CK_BBOOL);
        return CKR_OK;
    }
    CK_ULONG number;
    switch (type) {
    case CKA_CLASS: number = (CK_ULONG)o->klass; break;
    case CKA_KEY_TYPE: number = (CK_ULONG)o->key_type; break;
    case CKA_VALUE_LEN: number = o->value_len; break;
    case CKA_LABEL: *value = o->label; *len = o->label_len; return CKR_OK;
    case CKA_ID: *value = o->ckaid; *len = o->ckaid_len; return CKR_OK;
    case CKA_APPLICATION: *value = o->application; *len = o->application_len; return CKR_OK;
    case CKA_CHECK_VALUE:
        check_value(o, scratch);
        *value = scratch;
        *len = 3;
        return CKR_OK;
    case CKA_VALUE:
        if (is_key(o) && (o->sensitive || !o->extractable)) return CKR_ATTRIBUTE_SENSITIVE;
        *value = o->value;
        *len = o->value_len;
        return CKR_OK;
    default:
        return CKR_ATTRIBUTE_TYPE_INVALID;
    }
    memcpy(scratch, &number, sizeof number);
    *value = scratch;
    *len = sizeof number;
    return CKR_OK;
}

CK_RV nh_template_check_pointers(CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
    if (count > 0 && tmpl == NULL) return CKR_ARGUMENTS_BAD;
    for (CK_ULONG i = 0; i < count; i++)
        if (tmpl[i].pValue == NULL && tmpl[i].ulValueLen > 0) return CKR_ARGUMENTS_BAD;
    return CKR_OK;
}

// Does the template attribute hold exactly the object's current value?
static int same_as_current(const struct nh_object *o, const CK_ATTRIBUTE *a) {
    const void *value;
    CK_ULONG len;
    uint8_t scratch[sizeof(CK_ULONG)];
    if (nh_attribute_read(o, a->type, &value, &len, scratch) != CKR_OK) return 0;
    return len == a->ulValueLen && (len == 0 || memcmp(value, a->pValue, len) == 0);
}

static CK_RV set_bytes(uint8_t *field, uint32_t *field_len, size_t max, const CK_ATTRIBUTE *a) {
    if (a->ulValueLen > max) return CKR_ATTRIBUTE_VALUE_INVALID;
    if (a->ulValueLen > 0) memcpy(field, a->pValue, a->ulValueLen);
    *field_len = (uint32_t)a->ulValueLen;
    return CKR_OK;
}

CK_RV nh_template_apply(struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count, enum nh_template_mode mode) {
    CK_RV rv = nh_template_check_pointers(tmpl, count);
    if (rv != CKR_OK) return rv;

    // The class first: it decides which attributes exist.
    if (mode != NH_COPY) {
        CK_ULONG klass = mode == NH_GENERATE ? CKO_SECRET_KEY : (CK_ULONG)-1;
        for (CK_ULONG i = 0; i < count; i++) {
            if (tmpl[i].type != CKA_CLASS) continue;
            if (tmpl[i].ulValueLen != sizeof(CK_ULONG)) return CKR_ATTRIBUTE_VALUE_INVALID;
            CK_ULONG v = read_ulong(&tmpl[i]);
            if (mode == NH_GENERATE && v != CKO_SECRET_KEY) return CKR_TEMPLATE_INCONSISTENT;
            if (klass != (CK_ULONG)-1 && v != klass) return CKR_TEMPLATE_INCONSISTENT;
            if (v != CKO_SECRET_KEY && v != CKO_DATA) return CKR_ATTRIBUTE_VALUE_INVALID;
            klass = v;
        }
        if (klass == (CK_ULONG)-1) return CKR_TEMPLATE_INCOMPLETE;
        memset(o, 0, sizeof *o);
        o->klass = klass;
        o->modifiable = 1;
        if (klass == CKO_SECRET_KEY) {
            o->key_type = CKK_GENERIC_SECRET;
            o->private_ = 1;
            o->extractable = 1;
            o->sign = 1;
            o->verify = 1;
            o->local = mode == NH_GENERATE;
        }
    }

    int have_key_type = mode != NH_CREATE, have_value = 0, have_value_len = 0, have_check = 0;
    uint8_t wanted_check[3] = {0};
    for (CK_ULONG i = 0; i < count; i++) {
        const CK_ATTRIBUTE *a = &tmpl[i];
        if (!defined_for(o, a->type)) return CKR_ATTRIBUTE_TYPE_INVALID;
        if (is_bool_attribute(a->type) && a->ulValueLen != sizeof(CK_BBOOL)) return CKR_ATTRIBUTE_VALUE_INVALID;
        if ((a->type == CKA_CLASS || a->type == CKA_KEY_TYPE || a->type == CKA_VALUE_LEN) &&
            a->ulValueLen != sizeof(CK_ULONG))
            return CKR_ATTRIBUTE_VALUE_INVALID;
        int on = is_bool_attribute(a->type) && *(const CK_BBOOL *)a->pValue != CK_FALSE;

        switch (a->type) {
        case CKA_CLASS:
            if (mode == NH_COPY && !same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
            break;
        case CKA_KEY_TYPE:
            if (read_ulong(a) != CKK_GENERIC_SECRET)
                return mode == NH_COPY ? CKR_ATTRIBUTE_READ_ONLY
                                       : mode == NH_GENERATE ? CKR_TEMPLATE_INCONSISTENT : CKR_ATTRIBUTE_VALUE_INVALID;
            have_key_type = 1;
            break;
        case CKA_TOKEN: case CKA_PRIVATE: case CKA_MODIFIABLE:
            *bool_field(o, a->type) = (uint8_t)on;
            break;
        case CKA_LABEL:
            if ((rv = set_bytes(o->label, &o->label_len, NH_MAX_SHORT, a)) != CKR_OK) return rv;
            break;
        case CKA_ID:
            if ((rv = set_bytes(o->ckaid, &o->ckaid_len, NH_MAX_SHORT, a)) != CKR_OK) return rv;
            break;
        case CKA_APPLICATION:
            if ((rv = set_bytes(o->application, &o->application_len, NH_MAX_SHORT, a)) != CKR_OK) return rv;
            break;
        case CKA_SENSITIVE:  // on a copy it may only be switched on
            if (mode == NH_COPY && o->sensitive && !on) return CKR_ATTRIBUTE_READ_ONLY;
            o->sensitive = (uint8_t)on;
            break;
        case CKA_EXTRACTABLE:  // on a copy it may only be switched off
            if (mode == NH_COPY && !o->extractable && on) return CKR_ATTRIBUTE_READ_ONLY;
            o->extractable = (uint8_t)on;
            break;
        case CKA_SIGN: case CKA_VERIFY: case CKA_ALWAYS_AUTHENTICATE:
        case CKA_ENCRYPT: case CKA_DECRYPT: case CKA_WRAP: case CKA_UNWRAP: case CKA_DERIVE:
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
            } else {
                *bool_field(o, a->type) = (uint8_t)on;
            }
            break;
        case CKA_LOCAL: case CKA_ALWAYS_SENSITIVE: case CKA_NEVER_EXTRACTABLE:
            if (mode != NH_COPY || !same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
            break;
        case CKA_VALUE:
            if (mode == NH_GENERATE) return CKR_TEMPLATE_INCONSISTENT;
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
                break;
            }
            if (is_key(o) && a->ulValueLen == 0) return CKR_ATTRIBUTE_VALUE_INVALID;
            if ((rv = set_bytes(o->value, &o->value_len, NH_MAX_VALUE, a)) != CKR_OK) return rv;
            have_value = 1;
            break;
        case CKA_VALUE_LEN:
            if (mode == NH_CREATE) return CKR_TEMPLATE_INCONSISTENT;
            if (mode == NH_COPY) {
                if (!same_as_current(o, a)) return CKR_ATTRIBUTE_READ_ONLY;
                break;
            }
            if (read_ulong(a) == 0 || read_ulong(a) > NH_MAX_VALUE) return CKR_ATTRIBUTE_VALUE_INVALID;
            o->value_len = (uint32_t)read_ulong(a);
            have_value_len = 1;
            break;
        case CKA_CHECK_VALUE:
            if (mode == NH_CREATE) {
                if (a->ulValueLen != 3) return CKR_ATTRIBUTE_VALUE_INVALID;
                memcpy(wanted_check, a->pValue, 3);
                have_check = 1;
            } else if (mode == NH_GENERATE || !same_as_current(o, a)) {
                return CKR_ATTRIBUTE_READ_ONLY;
            }
            break;
        default:
            return CKR_ATTRIBUTE_TYPE_INVALID;
        }
    }

    if (is_key(o)) {
        if (mode == NH_CREATE) {
            if (!have_key_type || !have_value) return CKR_TEMPLATE_INCOMPLETE;
            if (have_check) {
                uint8_t actual[3];
                check_value(o, actual);
                if (memcmp(actual, wanted_check, 3) != 0) return CKR_ATTRIBUTE_VALUE_INVALID;
            }
            o->always_sensitive = 0;  // the value came from outside
            o->never_extractable = 0;
        } else if (mode == NH_GENERATE) {
            if (!have_value_len) return CKR_TEMPLATE_INCOMPLETE;
            o->always_sensitive = o->sensitive;
            o->never_extractable = !o->extractable;
        }
    }
    return CKR_OK;
}

int nh_object_matches(const struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
    for (CK_ULONG i = 0; i < count; i++)
        if (!same_as_current(o, &tmpl[i])) return 0;
    return 1;
}

CK_RV nh_attributes_set(struct nh_object *o, CK_ATTRIBUTE_PTR tmpl, CK_ULONG count) {
    CK_RV rv = nh_template_check_pointers(tmpl, count);
    if (rv != CKR_OK) return rv;
    for (CK_ULONG i = 0; i < count; i++) {
        CK_ATTRIBUTE_TYPE type = tmpl[i].type;
        if (!defined_for(o, type)) return CKR_ATTRIBUTE_TYPE_INVALID;
        if (type != CKA_LABEL && type != CKA_ID) return CKR_ATTRIBUTE_READ_ONLY;
        if (!o->modifiable) return CKR_ATTRIBUTE_READ_ONLY;
        if (tmpl[i].ulValueLen > NH_MAX_SHORT) return CKR_ATTRIBUTE_VALUE_INVALID;
    }
    for (CK_ULONG i = 0; i < count; i++) {
        if (tmpl[i].type == CKA_LABEL)
            set_bytes(o->label, &o->label_len, NH_MAX_SHORT, &tmpl[i]);
        else
            set_bytes(o->ckaid, &o->ckaid_len, NH_MAX_SHORT, &tmpl[i]);
    }
    return CKR_OK;
}
