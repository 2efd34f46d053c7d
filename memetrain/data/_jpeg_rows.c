/* Decode a batch of JPEGs into the rows of one uint8 buffer, in one call that releases the GIL.
 *
 * decode_rows(images, out, height, width) -> bytes
 *
 * images: a sequence of objects with the buffer protocol (memoryviews of a mapped shard, bytes).
 * out: a writable contiguous buffer of at least len(images) * height * width * 3 bytes; image i is
 * written as [height, width, 3] RGB at byte i * height * width * 3.
 * Returns one status byte per image: 1 decoded; 0 not decoded, because it is not a 3-component
 * (YCbCr or RGB) JPEG of exactly height x width, or because libjpeg reported an error or a warning
 * (corrupt data). The caller decodes those one at a time (memetrain.data.decode.decode_rgb), which
 * gives the pixels or the error message; a row whose image was not decoded holds anything.
 *
 * The decode is the one simplejpeg (TurboJPEG) makes with its defaults: islow DCT, fancy
 * upsampling, warnings treated as errors; the pixels are the same (tests/data/test_decode.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>

#include <jpeglib.h>

struct error_jump {
    struct jpeg_error_mgr manager;
    jmp_buf jump;
};

static void jump_on_error(j_common_ptr info) { longjmp(((struct error_jump *)info->err)->jump, 1); }

static void jump_on_warning(j_common_ptr info, int level) {
    if (level < 0) /* a warning: corrupt data that libjpeg would patch over */
        longjmp(((struct error_jump *)info->err)->jump, 1);
}

/* Decodes images[i] into rows + i * height * width * 3, setting status[i]; no Python calls. */
static void decode_all(Py_ssize_t count, Py_buffer *images, unsigned char *rows, int height, int width,
                       JSAMPROW *row_pointers, char *status) {
    struct jpeg_decompress_struct info;
    struct error_jump error;
    const size_t image_bytes = (size_t)height * width * 3;
    volatile Py_ssize_t i;

    info.err = jpeg_std_error(&error.manager);
    error.manager.error_exit = jump_on_error;
    error.manager.emit_message = jump_on_warning;
    jpeg_create_decompress(&info);
    for (i = 0; i < count; i++) {
        status[i] = 0;
        if (setjmp(error.jump)) {
            jpeg_abort_decompress(&info);
            continue;
        }
        if (images[i].len < 3)
            continue;
        jpeg_mem_src(&info, images[i].buf, (unsigned long)images[i].len);
        jpeg_read_header(&info, TRUE);
        if ((int)info.image_height != height || (int)info.image_width != width || info.num_components != 3 ||
            (info.jpeg_color_space != JCS_YCbCr && info.jpeg_color_space != JCS_RGB)) {
            jpeg_abort_decompress(&info);
            continue;
        }
        info.out_color_space = JCS_RGB;
        info.dct_method = JDCT_ISLOW;
        info.do_fancy_upsampling = TRUE;
        jpeg_start_decompress(&info);
        unsigned char *image = rows + i * image_bytes;
        for (int row = 0; row < height; row++)
            row_pointers[row] = image + (size_t)row * width * 3;
        while (info.output_scanline < info.output_height)
            jpeg_read_scanlines(&info, row_pointers + info.output_scanline, info.output_height - info.output_scanline);
        jpeg_finish_decompress(&info);
        status[i] = 1;
    }
    jpeg_destroy_decompress(&info);
}

static PyObject *decode_rows(PyObject *module, PyObject *args) {
    PyObject *sequence, *images_seq = NULL, *result = NULL;
    Py_buffer out, *images = NULL;
    JSAMPROW *row_pointers = NULL;
    Py_ssize_t count, acquired = 0;
    int height, width;

    if (!PyArg_ParseTuple(args, "Ow*ii", &sequence, &out, &height, &width))
        return NULL;
    if (height <= 0 || width <= 0) {
        PyErr_SetString(PyExc_ValueError, "decode_rows: height and width must be positive");
        goto done;
    }
    images_seq = PySequence_Fast(sequence, "decode_rows: images must be a sequence");
    if (images_seq == NULL)
        goto done;
    count = PySequence_Fast_GET_SIZE(images_seq);
    if ((size_t)out.len < (size_t)count * height * width * 3) {
        PyErr_Format(PyExc_ValueError, "decode_rows: out holds %zd bytes, %zd images of %dx%d need %zu", out.len,
                     count, height, width, (size_t)count * height * width * 3);
        goto done;
    }
    images = PyMem_Calloc(count ? count : 1, sizeof(Py_buffer));
    row_pointers = PyMem_Malloc(sizeof(JSAMPROW) * height);
    result = PyBytes_FromStringAndSize(NULL, count);
    if (images == NULL || row_pointers == NULL || result == NULL) {
        Py_CLEAR(result);
        PyErr_NoMemory();
        goto done;
    }
    for (; acquired < count; acquired++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(images_seq, acquired), &images[acquired], PyBUF_SIMPLE) < 0) {
            Py_CLEAR(result);
            goto done;
        }
    }
    Py_BEGIN_ALLOW_THREADS
    decode_all(count, images, out.buf, height, width, row_pointers, PyBytes_AS_STRING(result));
    Py_END_ALLOW_THREADS

done:
    for (Py_ssize_t i = 0; i < acquired; i++)
        PyBuffer_Release(&images[i]);
    PyMem_Free(images);
    PyMem_Free(row_pointers);
    Py_XDECREF(images_seq);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"decode_rows", decode_rows, METH_VARARGS,
     "decode_rows(images, out, height, width) -> bytes: decode JPEGs of exactly height x width into the\n"
     "consecutive [height, width, 3] RGB rows of out, without the GIL; one status byte per image, 1 if\n"
     "decoded (0: decode it another way, which also names its error)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpeg_rows", NULL, -1, methods};

PyMODINIT_FUNC PyInit__jpeg_rows(void) { return PyModule_Create(&module); }
